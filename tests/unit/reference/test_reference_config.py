"""Reference config: shipped YAML parses; the exact part hashes alone; bad values name their field."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from mechflow.errors import ConfigError
from mechflow.reference.config import EXACT_KEYS, ReferenceConfig, exact_settings

ROOT = Path(__file__).parents[3]
YAML = ROOT / "config" / "reference" / "default.yaml"
SCHEMA = json.loads((ROOT / "workflow" / "schemas" / "config" / "reference.schema.json").read_text())


def test_default_yaml_parses_and_validates():
    raw = yaml.safe_load(YAML.read_text())
    jsonschema.validate(raw, SCHEMA)
    assert ReferenceConfig.from_dict(raw) == ReferenceConfig()


def test_a_given_restriction_starts_from_the_restriction_defaults():
    cfg = ReferenceConfig.from_dict({"restriction": {"components": "heads"}})
    assert (cfg.restriction.last_layers, cfg.restriction.components) == (None, "heads")
    assert ReferenceConfig().restriction.last_layers == 4


def test_exact_part_excludes_method_settings():
    raw = yaml.safe_load(YAML.read_text())
    assert set(exact_settings(raw)) == set(EXACT_KEYS)
    a = ReferenceConfig.from_dict(raw)
    b = ReferenceConfig.from_dict({**raw, "ig_steps": 9, "positives": {"top_fraction": 0.2, "threshold": 0.5},
                                   "max_batch_rows": 8})
    assert a.exact_hash() == b.exact_hash() and a.hash() != b.hash()
    assert a.exact_hash() != ReferenceConfig.from_dict({**raw, "seed": 1}).exact_hash()


@pytest.mark.parametrize("cfg, field", [
    ({"n_prompts": 0}, r"reference\.n_prompts"),
    ({"n_sampled_edges": -1}, r"reference\.n_sampled_edges"),
    ({"seed": 1.5}, r"reference\.seed"),
    ({"ig_rule": "right"}, r"reference\.ig_rule"),
    ({"positives": {"top_fraction": 1.0}}, r"reference\.positives\.top_fraction"),
    ({"positives": {"threshold": 0}}, r"reference\.positives\.threshold"),
    ({"positives": {"top_k": 5}}, r"reference\.positives\.top_k: unknown key"),
    ({"restriction": {"last_layers": 0}}, r"reference\.restriction\.last_layers"),
    ({"restriction": {"typo": 0}}, r"reference\.restriction\.typo: unknown key"),
    ({"tasks": "ioi"}, r"reference\.tasks"),
    ({"sample": 3}, r"reference\.sample: unknown key"),
])
def test_bad_values_name_the_field(cfg, field):
    with pytest.raises(ConfigError, match=field):
        ReferenceConfig.from_dict(cfg)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, SCHEMA)
