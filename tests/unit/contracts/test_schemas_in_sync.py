"""`workflow/schemas/**` is what `python -m mechflow.contracts.export` writes from the contracts.

Fix a failure by running ``python -m mechflow.contracts.export`` (and committing the files).
"""

from __future__ import annotations

import subprocess
import sys

from mechflow.config import REPO_ROOT
from mechflow.contracts import export


def test_contract_schemas_are_generated_and_nothing_is_stale():
    problems = export.drift(REPO_ROOT, config=False)
    assert not problems, "run `python -m mechflow.contracts.export`:\n" + "\n".join(problems)


def test_config_group_schemas_are_generated():
    problems = [p for p in export.drift(REPO_ROOT) if p.startswith(str(export.CONFIG_DIR))]
    assert not problems, "run `python -m mechflow.contracts.export`:\n" + "\n".join(problems)


def test_every_config_group_with_a_model_is_exported():
    expected = export.expected_files()
    for group in export.config_schemas():
        text = expected[export.CONFIG_DIR / f"{group}.schema.json"]
        assert '"$schema": "https://json-schema.org/draft/2020-12/schema"' in text, group


def test_check_lists_drift_and_stale_files_and_writes_nothing(tmp_path):
    stale = tmp_path / export.CONTRACTS_DIR / "old_document.schema.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}\n")
    circuit = tmp_path / export.CONTRACTS_DIR / "circuit.schema.json"
    circuit.write_text("{}\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    run = subprocess.run([sys.executable, "-m", "mechflow.contracts.export", "--check", "--root", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO_ROOT)
    assert run.returncode == 1
    assert "old_document.schema.json: stale" in run.stderr
    assert "circuit.schema.json: differs" in run.stderr
    assert "task_baseline.schema.json: missing" in run.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_write_then_check_is_clean_and_removes_stale_files(tmp_path):
    stale = tmp_path / export.CONTRACTS_DIR / "parquet" / "gone.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}\n")
    assert export.main(["--root", str(tmp_path)]) == 0
    assert not stale.exists()
    assert export.main(["--check", "--root", str(tmp_path)]) == 0
    assert export.drift(tmp_path) == []
