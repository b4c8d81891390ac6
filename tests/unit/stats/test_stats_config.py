"""StatsConfig and its generated schema reject the same bad values, each naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from mechflow.errors import ConfigError
from mechflow.stats.config import StatsConfig

ROOT = Path(__file__).resolve().parents[3]
SCHEMA = json.loads((ROOT / "workflow/schemas/config/stats.schema.json").read_text())
DEFAULT = yaml.safe_load((ROOT / "config/stats/default.yaml").read_text())


def test_default_yaml_parses_and_validates():
    assert StatsConfig.from_dict(DEFAULT) == StatsConfig()
    jsonschema.validate(DEFAULT, SCHEMA)


@pytest.mark.parametrize(
    ("override", "field"),
    [({"B": 0}, "stats.B"), ({"B": 2.5}, "stats.B"), ({"ci_level": 1.0}, "stats.ci_level"),
     ({"ci_level": 0}, "stats.ci_level"), ({"top_k": 0}, "stats.top_k"), ({"fcas_null": "flip"}, "stats.fcas_null"),
     ({"n_permutations": 0}, "stats.n_permutations"), ({"ci_methods": ["bca", "normal"]}, "stats.ci_methods"),
     ({"ci_methods": ["bca", "bca"]}, "stats.ci_methods"), ({"ci_methods": []}, "stats.ci_methods"),
     ({"quantiles": [0.5, 1.5]}, "stats.quantiles"), ({"seed": -1}, "stats.seed"),
     ({"Bee": 3}, "stats.Bee: unknown key")],
)
def test_bad_values_fail_in_model_and_schema_naming_the_field(override, field):
    bad = {**DEFAULT, **override}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        StatsConfig.from_dict(bad)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)


def test_to_dict_is_plain_json():
    assert StatsConfig().to_dict()["ci_methods"] == ["percentile", "bca"]
    assert StatsConfig.from_dict({"quantiles": [0.5]}).quantiles == (0.5,)
