"""The `features` and `feature_matching` config groups: class defaults, one clear error per bad value."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from mechflow.config import compose_config
from mechflow.errors import ConfigError
from mechflow.features.config import FeatureMatchingConfig, FeaturesConfig
from mechflow.stats.config import StatsConfig

SCHEMAS = Path(__file__).resolve().parents[3] / "workflow" / "schemas" / "config"


def test_feature_matching_keeps_the_seed_and_null_it_had_in_stats():
    """Feature matching read stats.seed / feature_null / feature_n_permutations before it had a group:
    the defaults are those values, so its results do not change."""
    cfg = compose_config([])
    assert cfg["feature_matching"] == {"seed": StatsConfig().seed, "null_kind": "shuffle", "n_permutations": 100}
    assert "features" not in cfg["sae"] and FeaturesConfig.from_dict(cfg["features"]) == FeaturesConfig()
    smoke = compose_config(["+experiment=smoke"])["features"]
    assert (smoke["n_features"], smoke["n_verify"], smoke["tasks"]) == (8, 4, ["ioi"])


@pytest.mark.parametrize(("model", "group", "override", "field"), [
    (FeaturesConfig, "features", {"n_features": 0}, "features.n_features"),
    (FeaturesConfig, "features", {"ablation": "mean"}, "features.ablation"),
    (FeaturesConfig, "features", {"tasks": "ioi"}, "features.tasks"),
    (FeaturesConfig, "features", {"top_k": 3}, "features.top_k: unknown key"),
    (FeatureMatchingConfig, "feature_matching", {"null_kind": "bogus"}, "feature_matching.null_kind"),
    (FeatureMatchingConfig, "feature_matching", {"n_permutations": 0}, "feature_matching.n_permutations"),
    (FeatureMatchingConfig, "feature_matching", {"seed": -1}, "feature_matching.seed"),
])
def test_bad_values_fail_in_model_and_schema_naming_the_field(model, group, override, field):
    bad = {**model().to_dict(), **override}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        model.from_dict(bad)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json.loads((SCHEMAS / f"{group}.schema.json").read_text()))
