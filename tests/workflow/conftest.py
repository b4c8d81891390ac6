"""Fixtures of the workflow tests."""

from __future__ import annotations

import pytest
from smoke_subset import OVERRIDES, TARGETS
from test_dag import snakemake


@pytest.fixture(scope="session")
def subset_reference(tmp_path_factory):
    """The smoke subset (`smoke_subset.TARGETS`) run locally, uninterrupted: what the SLURM run and
    the killed-and-resumed runs must reproduce."""
    folder = tmp_path_factory.mktemp("subset_reference")
    done = snakemake(*TARGETS, "--cores", "2", "--config", OVERRIDES, cwd=folder, timeout=2400)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder
