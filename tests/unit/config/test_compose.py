"""Config composition, sweeps, run names and validation errors (no model is loaded)."""

from __future__ import annotations

import pytest

from mechflow.config import compose_config, compose_runs, expand_sweeps, parse_overrides
from mechflow.errors import ConfigError


def test_default_config_composes_with_every_stage_group():
    cfg = compose_config([])
    assert cfg["model"]["name"] == "smollm2_135m"
    for group in ("model", "corpus", "harvest", "task", "summary"):
        assert group in cfg, group
    assert set(cfg["task"]) == {"ioi", "factual_recall", "greater_than"}


def test_override_reaches_the_group_and_changes_the_hash():
    base = compose_runs([])
    changed = compose_runs(["harvest.batch_size=3"])
    (b,), (c,) = base.values(), changed.values()
    assert c.cfg["harvest"]["batch_size"] == 3
    assert b.hash != c.hash
    assert b.cfg["model"] == c.cfg["model"]  # other groups untouched: their rules do not re-run


def test_task_selection_override():
    cfg = compose_config(["task=[ioi]"])
    assert list(cfg["task"]) == ["ioi"]


def test_experiment_sizes_do_not_resurrect_unselected_tasks():
    cfg = compose_config(["+experiment=smoke", "task=[ioi,greater_than]"])
    assert sorted(cfg["task"]) == ["greater_than", "ioi"] and cfg["task"]["ioi"]["n_prompts"] == 16


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, []),
        ("model=gemma3_270m harvest.layers=[3,6]", ["model=gemma3_270m", "harvest.layers=[3,6]"]),
        ('["model=gemma3_270m", "seed=2"]', ["model=gemma3_270m", "seed=2"]),
        (["seed=1"], ["seed=1"]),
    ],
)
def test_parse_overrides_accepts_string_list_and_yaml(value, expected):
    assert parse_overrides(value) == expected


def test_sweep_expands_to_cartesian_product():
    combos = expand_sweeps(["model=smollm2_135m,gemma3_270m", "harvest.layers=[3,6]", "seed=1,2"])
    assert len(combos) == 4
    assert all("harvest.layers=[3,6]" in c for c in combos)


def test_sweep_gives_one_named_run_per_point():
    runs = compose_runs(["model=smollm2_135m,gemma3_270m", "seed=0,1"])
    assert sorted(runs) == ["gemma3_270m__seed=0", "gemma3_270m__seed=1", "smollm2_135m__seed=0",
                            "smollm2_135m__seed=1"]
    assert runs["gemma3_270m__seed=1"].cfg["seed"] == 1


def test_run_name_override_and_collision():
    assert list(compose_runs(["run_name=mine"])) == ["mine"]
    with pytest.raises(ConfigError, match="run_name"):
        compose_runs(["run_name=same", "seed=0,1"])


def test_unknown_key_error_names_field_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        compose_config(["+harvest.shard_rowz=10"])
    assert "harvest" in str(err.value) and "shard_rowz" in str(err.value) and "Allowed keys" in str(err.value)


def test_wrong_type_error_names_field_and_fix():
    with pytest.raises(ConfigError) as err:
        compose_config(["threads=0"])
    assert "threads" in str(err.value) and "override" in str(err.value)


def test_bad_model_dtype_is_rejected_with_choices():
    with pytest.raises(ConfigError, match=r"model\.dtype"):
        compose_config(["model.dtype=int8"])


def test_unknown_config_option_is_a_config_error():
    with pytest.raises(ConfigError, match="model"):
        compose_config(["model=does_not_exist"])


def test_bad_task_field_names_the_task():
    with pytest.raises(ConfigError, match=r"task\.ioi"):
        compose_config(["+task.ioi.bogus=1"])


@pytest.mark.parametrize("experiment", ["clt", "dictionaries"])
def test_dictionary_experiments_harvest_what_their_transcoder_reads(experiment):
    """`+experiment=clt|dictionaries` validate, and their harvest holds every MLP in/out hook the
    cross-layer transcoder trains on and the SAE's hook (else train_transcoder would stop)."""
    from mechflow.harvest.config import HOOK_POINTS

    cfg = compose_config([f"+experiment={experiment}"])
    tc, hv = cfg["transcoder"], cfg["harvest"]
    assert tc["kind"] == "clt"
    harvested = {HOOK_POINTS[p].format(layer=layer) for layer in hv["layers"] for p in hv["hook_points"]}
    harvested |= set(hv["hooks"])
    wanted = {h.format(layer=layer) for layer in tc["layers"] for h in (tc["in_hook"], tc["out_hook"])}
    assert wanted | {cfg["sae"]["hook"]} <= harvested


@pytest.mark.parametrize("overrides, ok", [(["sae.d_in=512"], False), (["sae.d_in=576"], True),
                                           (["sae.d_in=1536", "sae.hook=blocks.3.mlp.hook_post",
                                             "harvest.hooks=[blocks.3.mlp.hook_post]"], True),
                                           (["sae.d_in=576", "sae.hook=blocks.3.mlp.hook_post",
                                             "harvest.hooks=[blocks.3.mlp.hook_post]"], False),
                                           (["model=gemma3_270m", "sae.d_in=576"], False)])
def test_sae_width_is_checked_when_the_config_is_composed(overrides, ok):
    """An SAE d_in that cannot match its hook's width in the model is one ConfigError at composition
    (the model group states d_model / d_mlp; checked when the model loads), not at training."""
    from mechflow.workflow.runs import check_dictionary_widths

    (run,) = compose_runs(overrides).values()
    if ok:
        check_dictionary_widths(run)
    else:
        with pytest.raises(ConfigError, match=r"sae\.d_in: \d+ cannot match .* set sae\.d_in=\d+ or null"):
            check_dictionary_widths(run)
