"""`make lint`'s checks, so that CI (`make test`) fails when they do: ruff (Python style and
imports), snakefmt (rule files), import-linter (the layer contracts of ARCHITECTURE.md and no
import cycles; configured in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {BIN}: run `make setup` (it installs the `lint` extra)")
    return str(path)


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_is_clean():
    result = run(tool("ruff"), "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_rule_files_are_snakefmt_formatted():
    result = run(tool("snakefmt"), "--check", "Snakefile", "workflow/rules")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_import_layers_and_no_cycles():
    result = run(tool("lint-imports"), "--no-cache", "--no-logo")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
