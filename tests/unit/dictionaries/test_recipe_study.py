"""The dictionary recipe study's recipes compose into valid configs that differ as they say."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mechflow.config import compose_config

REPO = Path(__file__).resolve().parents[3]


def _study():
    spec = importlib.util.spec_from_file_location("sae_recipes", REPO / "benchmarks" / "sae_recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_recipe_composes_and_changes_only_what_it_lists():
    base, recipes = _study().load_recipes(REPO / "benchmarks" / "sae_recipes.yaml")
    reference = compose_config(base)
    assert "baseline" in recipes and recipes["baseline"]["overrides"] == []
    for name, recipe in recipes.items():
        cfg = compose_config(base + recipe["overrides"])
        stage = recipe["stage"]
        # a group choice (`transcoder=clt`) swaps the whole group: compare against base + that choice
        choices = [o for o in recipe["overrides"] if "." not in o.split("=")[0]]
        ref = compose_config(base + choices) if choices else reference
        changed = {k for k in cfg[stage] if cfg[stage][k] != ref[stage][k]}
        listed = {o.split("=")[0].split(".")[1] for o in recipe["overrides"] if o not in choices}
        assert changed == listed, name
        assert cfg[stage]["data"]["holdout_shards"] == 3  # >= 30k held-out tokens for the dead rule
