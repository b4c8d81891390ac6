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
        # every difference is listed; a listed value may equal the group's own (clt.yaml's) default
        assert changed <= listed, (name, changed - listed)
        assert changed or not listed, name
        assert cfg[stage]["data"]["holdout_shards"] == 3  # >= 30k held-out tokens for the dead rule


def test_the_dictionaries_experiment_trains_the_studys_best_recipes():
    """README quotes `+experiment=dictionaries` with the numbers of these two recipes."""
    base, recipes = _study().load_recipes(REPO / "benchmarks" / "sae_recipes.yaml")
    experiment = compose_config(["+experiment=dictionaries"])
    bookkeeping = {"n_checkpoints", "log_every"}  # do not change what is trained
    jumprelu_only = {k for k in experiment["sae"] if k.startswith("jumprelu_")} | {"l0_coefficient"}
    for name, stage, ignore in (("lr_1.6e-3_drop_outliers", "sae", bookkeeping | jumprelu_only),
                                ("clt_target_l0_32_long", "transcoder", bookkeeping)):
        recipe = compose_config(base + recipes[name]["overrides"])[stage]
        assert experiment[stage]["architecture" if stage == "sae" else "kind"] in ("topk", "clt")
        differ = {k for k in recipe if k not in ignore and recipe[k] != experiment[stage][k]}
        assert not differ, (name, differ)
