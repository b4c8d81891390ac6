"""Benchmark config: shipped YAML parses; every bad value names its field, once, when the config is
built (ACDC and the comparison read validated values)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml

from mechflow.benchmark.config import AcdcConfig, BenchmarkConfig, RestrictionConfig
from mechflow.benchmark.restriction import EdgeRestriction
from mechflow.circuits.graph import EdgeGraph
from mechflow.errors import ConfigError

ROOT = Path(__file__).parents[3]
SCHEMA = json.loads((ROOT / "workflow" / "schemas" / "config" / "benchmark.schema.json").read_text())


@pytest.mark.parametrize("name", ["default", "last4"])
def test_shipped_yaml_parses_and_validates(name):
    raw = yaml.safe_load((ROOT / "config" / "benchmark" / f"{name}.yaml").read_text())
    raw = {k: v for k, v in raw.items() if k != "defaults"}
    jsonschema.validate(raw, SCHEMA)
    cfg = BenchmarkConfig.from_dict(raw)
    assert cfg.acdc.thresholds == (0.001, 0.003, 0.01, 0.03, 0.1)


def test_recorded_settings_leave_out_the_rule_keys():
    cfg = BenchmarkConfig.from_dict({"enabled": True, "tasks": ["ioi", "greater_than"], "target": 0.9})
    assert set(cfg.to_dict()) == {"n_prompts", "restriction", "acdc"}
    assert cfg.hash() == BenchmarkConfig().hash()
    assert cfg.to_dict()["acdc"]["thresholds"] == [0.001, 0.003, 0.01, 0.03, 0.1]
    assert cfg.compare_dict() == {"target": 0.9, "ig_steps": 5, "ig_rule": "left",
                                  "percentages": [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100],
                                  "reference_threshold": None, "acdc_match": "closest"}
    assert BenchmarkConfig.SELECTION_KEYS == ("enabled", "tasks")


def test_the_rule_params_leave_out_the_selection_keys(monkeypatch):
    """`stage_cfg("benchmark")` drops `SELECTION_KEYS`: toggling them does not re-run a benchmark."""
    from types import SimpleNamespace

    from mechflow.config import compose_runs
    from mechflow.workflow import inputs, runs

    (name, run_), = compose_runs().items()
    monkeypatch.setitem(runs.RUNS, name, run_)
    params = inputs.stage_cfg("benchmark")(SimpleNamespace(run=name))
    assert set(run_.cfg["benchmark"]) - set(params) == {"enabled", "tasks"}
    assert params["target"] == 0.8 and "compare" not in params


def test_target_is_checked_as_the_circuits_target():
    """One statement of the constraint (`mechflow.circuits.config.Target`), two groups."""
    from mechflow.circuits.config import CircuitConfig

    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match=r"benchmark\.target") as mine:
            BenchmarkConfig.from_dict({"target": bad})
        with pytest.raises(ConfigError, match=r"circuits\.target") as theirs:
            CircuitConfig.from_dict({"target": bad})
        assert str(mine.value).split(":")[1][:40] == str(theirs.value).split(":")[1][:40]
    assert BenchmarkConfig.from_dict({"target": 1}).target == 1.0


@pytest.mark.parametrize("thresholds", [[], ["0.1"], [True], [0.1, -0.01], [0.1, 0.01], [0.01, 0.01], "0.1",
                                        [float("nan")]])
def test_bad_thresholds_name_the_field(thresholds):
    with pytest.raises(ConfigError, match=r"benchmark\.acdc\.thresholds"):
        BenchmarkConfig.from_dict({"acdc": {"thresholds": thresholds}})


@pytest.mark.parametrize("cfg, field", [
    ({"acdc": {"metric": "logit"}}, r"benchmark\.acdc\.metric.*'kl', 'task'"),
    ({"acdc": {"speculation": 0}}, r"benchmark\.acdc\.speculation"),
    ({"acdc": {"prune_dead": "yes"}}, r"benchmark\.acdc\.prune_dead"),
    ({"acdc": {"tau": [0.1]}}, r"benchmark\.acdc\.tau: unknown key"),
    ({"n_prompts": 0}, r"benchmark\.n_prompts"),
    ({"restriction": {"last_layers": 0}}, r"benchmark\.restriction\.last_layers"),
    ({"restriction": {"sender_last_layers": -1}}, r"benchmark\.restriction\.sender_last_layers"),
    ({"restriction": {"components": "mlps"}}, r"benchmark\.restriction\.components"),
    ({"tasks": []}, r"benchmark\.tasks"),
    ({"enabled": "yes"}, r"benchmark\.enabled"),
    ({"target": 0}, r"benchmark\.target"),
    ({"ig_steps": 0}, r"benchmark\.ig_steps"),
    ({"ig_rule": "right"}, r"benchmark\.ig_rule.*'left', 'midpoint'"),
    ({"percentages": []}, r"benchmark\.percentages"),
    ({"reference_threshold": 0}, r"benchmark\.reference_threshold"),
    ({"acdc_match": "best"}, r"benchmark\.acdc_match.*'closest', 'at_least'"),
    ({"compare": {"target": 0.8}}, r"benchmark\.compare: unknown key"),
    ({"method": "acdc"}, r"benchmark\.method: unknown key"),
])
def test_bad_values_raise_config_error_naming_field(cfg, field):
    with pytest.raises(ConfigError, match=field):
        BenchmarkConfig.from_dict(cfg)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, SCHEMA)


def test_budgets_must_increase():
    with pytest.raises(ConfigError, match=r"benchmark\.percentages.*strictly increasing"):
        BenchmarkConfig.from_dict({"percentages": [10, 1]})


def test_constructing_a_bad_config_is_a_config_error():
    with pytest.raises(ConfigError, match=r"benchmark\.acdc\.speculation"):
        AcdcConfig(speculation=0)
    with pytest.raises(ConfigError, match=r"benchmark\.restriction\.components"):
        RestrictionConfig(components="mlps")


def test_unknown_metric_is_refused_when_the_config_is_built():
    """The config is ACDC's one check of its metric and taus (`Acdc` reads validated values)."""
    with pytest.raises(ConfigError, match=r"benchmark\.acdc\.metric.*'kl', 'task'"):
        AcdcConfig(metric="mse")
    with pytest.raises(ConfigError, match=r"benchmark\.acdc\.thresholds"):
        AcdcConfig(thresholds=(0.1, 0.01))


def test_restriction_masks():
    g = EdgeGraph(n_layers=3, n_heads=2)
    full = EdgeRestriction.build(g)
    assert torch.equal(full.mask, g.valid) and full.n_edges == g.n_edges
    last = EdgeRestriction.build(g, {"last_layers": 1})
    receivers = {name.split("->")[1] for name in last.edge_names()}
    assert receivers == {"logits", "m2"} | {f"a2.h{h}<{k}>" for h in range(2) for k in "qkv"}
    assert last.n_edges == int(g.valid[:, g.first_receiver(2):].sum())
    heads = EdgeRestriction.build(g, {"components": "heads"})
    assert not any(n.startswith("m") or "->m" in n for n in heads.edge_names())
    assert any(n.startswith("input->") for n in heads.edge_names())
    circuit = torch.zeros_like(g.valid)
    circuit[0, g.logits_receiver] = True
    kept = last.full_kept(circuit)
    assert torch.equal(kept & last.mask, circuit) and torch.equal(kept & ~last.mask, g.valid & ~last.mask)
    assert torch.equal(last.removed(circuit), last.mask & ~circuit)
    scores = torch.arange(g.n_senders * g.n_receivers, dtype=torch.float64).reshape(g.valid.shape)
    order = last.ranked(scores)
    assert len(order) == last.n_edges and bool(last.mask.flatten()[order].all())
    assert torch.isnan(last.restrict_scores(scores)[~last.mask]).all()
    window = EdgeRestriction.build(g, {"last_layers": 1, "sender_last_layers": 1})
    assert {n.split("->")[0] for n in window.edge_names()} == {"a2.h0", "a2.h1", "m2"}
    assert set(window.edge_names()) == {"a2.h0->m2", "a2.h1->m2", "a2.h0->logits", "a2.h1->logits", "m2->logits"}
    with pytest.raises(ConfigError, match=r"benchmark\.restriction\.last_layers"):
        EdgeRestriction.build(g, {"last_layers": 4})
    with pytest.raises(ConfigError, match=r"benchmark\.restriction\.sender_last_layers"):
        EdgeRestriction.build(g, {"sender_last_layers": 4})
