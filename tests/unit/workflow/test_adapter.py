"""`run_rule`'s argument passing: named inputs/outputs/params, typed configs, missing names."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from mechflow.dictionaries.config import SAEConfig
from mechflow.errors import ConfigError
from mechflow.workflow.adapter import call_with_named


class ToyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = 3


def stage_typed(cfg: SAEConfig, *, out: Path, toy: ToyConfig, model_cfg: dict) -> tuple:
    return cfg, out, toy, model_cfg


def test_a_stage_receives_its_config_typed_and_other_values_unchanged(tmp_path):
    cfg, out, toy, model_cfg = call_with_named(stage_typed, {"cfg": {"hook": "blocks.3.hook_resid_post"},
                                                             "out": tmp_path, "toy": {"n": 5},
                                                             "model_cfg": {"name": "m"}, "unused": 1})
    assert isinstance(cfg, SAEConfig) and cfg.hook == "blocks.3.hook_resid_post"
    assert out == tmp_path and toy == ToyConfig(n=5) and model_cfg == {"name": "m"}


def stage_union(cfg: SAEConfig | Mapping[str, Any], *, other: Mapping[str, Any] | None = None) -> tuple:
    return cfg, other


def test_a_union_annotation_names_the_config_model_first():
    cfg, other = call_with_named(stage_union, {"cfg": {"hook": "h"}, "other": {"x": 1}})
    assert isinstance(cfg, SAEConfig) and cfg.hook == "h" and other == {"x": 1}


def test_a_bad_config_fails_with_the_config_error_of_its_model(tmp_path):
    with pytest.raises(ConfigError, match="sae"):
        call_with_named(stage_typed, {"cfg": {"bogus": 1}, "out": tmp_path, "toy": {}, "model_cfg": {}})


def test_a_missing_named_argument_names_what_the_rule_provides():
    with pytest.raises(TypeError, match=r"needs \['out'\].*provides"):
        call_with_named(stage_typed, {"cfg": {}, "toy": {}, "model_cfg": {}})


def test_temp_files_of_a_killed_try_are_removed_and_nothing_else(tmp_path):
    from mechflow.io import atomic_path
    from mechflow.workflow.adapter import remove_stale_temp_files

    out, folder = tmp_path / "summary.json", tmp_path / "shards"
    folder.mkdir()
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(out) as tmp:  # a kill in the middle of a write leaves no temp file here...
            tmp.write_text("{")
            raise KeyboardInterrupt
    stale = [tmp_path / ".summary.json.abc123.tmp", folder / ".part-0.parquet.x.tmp"]  # ...but a SIGKILL does
    keep = [tmp_path / "summary.json.bak", tmp_path / ".other.json.x.tmp", folder / "part-0.parquet"]
    for p in stale + keep:
        p.write_text("x")
    assert sorted(remove_stale_temp_files([out, folder])) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
