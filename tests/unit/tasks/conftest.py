"""Fixtures shared by the task tests: SmolLM2's shipped config and its tokenizer (no weights)."""

from __future__ import annotations

import pytest
from task_helpers import model_cfg


@pytest.fixture(scope="session")
def smol_cfg() -> dict:
    """config/model/smollm2_135m.yaml."""
    return model_cfg("smollm2_135m")


@pytest.fixture(scope="session")
def smol_tok(smol_cfg):
    """SmolLM2's tokenizer (no weights; cached per process) with the shipped BOS convention."""
    from mechflow.tasks import TaskTokenizer

    return TaskTokenizer.from_model_cfg(smol_cfg)
