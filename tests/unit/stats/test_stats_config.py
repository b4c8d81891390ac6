"""StatsConfig <-> default.yaml <-> JSON schema stay in sync; bad values name the field."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import jsonschema
import pytest
import yaml

from mechflow.errors import ConfigError
from mechflow.stats.config import StatsConfig

ROOT = Path(__file__).resolve().parents[3]
SCHEMA = json.loads((ROOT / "workflow/schemas/config/stats.schema.json").read_text())
DEFAULT = yaml.safe_load((ROOT / "config/stats/default.yaml").read_text())


def test_default_yaml_matches_dataclass_defaults_and_schema():
    assert StatsConfig.from_dict(DEFAULT).to_dict() == StatsConfig().to_dict()
    jsonschema.validate(DEFAULT, SCHEMA)


def test_schema_mirrors_dataclass():
    assert SCHEMA["additionalProperties"] is False
    assert set(SCHEMA["properties"]) == {f.name for f in fields(StatsConfig)}
    defaults = StatsConfig().to_dict()
    for name, prop in SCHEMA["properties"].items():
        assert prop.get("description"), name
        assert prop["default"] == defaults[name], name


@pytest.mark.parametrize(
    ("override", "field"),
    [({"B": 0}, "stats.B"), ({"B": 2.5}, "stats.B"), ({"ci_level": 1.0}, "stats.ci_level"),
     ({"ci_level": 0}, "stats.ci_level"), ({"top_k": 0}, "stats.top_k"), ({"fcas_null": "flip"}, "stats.fcas_null"),
     ({"n_permutations": 0}, "stats.n_permutations"), ({"ci_methods": ["bca", "normal"]}, "stats.ci_methods"),
     ({"quantiles": [0.5, 1.5]}, "stats.quantiles"), ({"seed": -1}, "stats.seed"),
     ({"feature_null": "x"}, "stats.feature_null"), ({"Bee": 3}, "stats.Bee")],
)
def test_bad_values_raise_config_error_naming_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        StatsConfig.from_dict({**DEFAULT, **override})
    bad = {**DEFAULT, **override}
    if field != "stats.Bee":  # the schema rejects the same values (unknown keys tested below)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, SCHEMA)


def test_schema_rejects_unknown_key():
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**DEFAULT, "Bee": 3}, SCHEMA)
