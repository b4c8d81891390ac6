"""The side-by-side benchmark (`mechflow.benchmark.compare`, stage `benchmark`) on the tiny llama,
checked against exact single-edge removals computed directly with `CircuitEvaluator`."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from mechflow.attribution.patching import TokenPairs
from mechflow.benchmark.compare import compare_methods
from mechflow.benchmark.config import BenchmarkConfig, RestrictionConfig
from mechflow.benchmark.evaluation import (
    RestrictedEvaluator,
    ResumedRestrictedEvaluator,
    exhaustive_effects,
    ranking_inputs,
    reference_positives,
)
from mechflow.benchmark.report import (
    BENCHMARK_MD,
    BENCHMARK_OUTPUTS,
    COLUMNS,
    CURVES_PNG,
    ROC_PNG,
    TABLE_CSV,
    TABLE_TEX,
    TIMING_COLUMNS,
    TIMINGS_JSON,
    benchmark_outputs,
)
from mechflow.benchmark.restriction import EdgeRestriction
from mechflow.benchmark.roc import roc_auc, roc_curve, step_auc
from mechflow.benchmark.stage import benchmark
from mechflow.circuits.faithfulness import CircuitEvaluator, prefix_mask
from mechflow.circuits.graph import EdgeGraph
from mechflow.errors import ConfigError
from mechflow.testing import random_token_pairs, write_tiny_task_dataset

CFG = {"n_prompts": 4, "restriction": {"last_layers": 1},
       "acdc": {"thresholds": [0.003, 0.03, 0.3], "speculation": 4},
       "target": 0.8, "ig_steps": 3}


def pairs(seed: int = 0, n: int = 4, pos: int = 6) -> TokenPairs:
    return random_token_pairs(seed, n, pos)


@pytest.fixture(scope="module")
def batch():
    return pairs(0)


@pytest.fixture(scope="module")
def result(tiny_llama, batch, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    doc = compare_methods(tiny_llama, batch, BenchmarkConfig.from_dict(CFG), **benchmark_outputs(out),
                          meta={"prompt_ids": ["p0", "p1", "p2", "p3"]})
    return doc, out


def read_table(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_the_rule_declares_every_file_the_stage_writes():
    rules = Path(__file__).resolve().parents[3] / "workflow" / "rules" / "benchmark.smk"
    block = rules.read_text().split("rule benchmark:\n", 1)[1].split("    output:\n", 1)[1].split("    log:\n", 1)[0]
    declared = re.findall(r'^ {8}(\w+)=(?:report\(\s*)?f?"[^"]*/([^"/]+)"', block, flags=re.M)
    assert dict(declared) == BENCHMARK_OUTPUTS
    assert sorted(BENCHMARK_OUTPUTS.values()) == sorted(
        [TABLE_CSV, TABLE_TEX, TIMINGS_JSON, ROC_PNG, CURVES_PNG, BENCHMARK_MD])


def test_writes_every_file_with_one_row_per_method(result):
    doc, out = result
    for name in (TABLE_CSV, TABLE_TEX, TIMINGS_JSON, ROC_PNG, CURVES_PNG, BENCHMARK_MD):
        assert (out / name).stat().st_size > 0, name
    assert not [p for p in out.iterdir() if p.name not in
                {TABLE_CSV, TABLE_TEX, TIMINGS_JSON, ROC_PNG, CURVES_PNG, BENCHMARK_MD}]  # no temp files left
    rows = read_table(out / TABLE_CSV)
    assert [r["method"].split(" ")[0] for r in rows] == ["acdc", "eap", "eap-ig", "ours", "exhaustive"]
    assert list(rows[0]) == list(COLUMNS)
    saved = json.loads((out / TIMINGS_JSON).read_text())
    assert saved["prompt_ids"] == ["p0", "p1", "p2", "p3"] and saved["config_hash"] == doc["config_hash"]
    assert saved["machine"]["torch_threads"] >= 1 and saved["restriction"]["last_layers"] == 1
    assert len(saved["acdc"]["runs"]) == 3
    h = doc["headline"]
    assert h["ratio"] == pytest.approx(h["acdc_seconds"] / (h["eap_ig_seconds"] + h["search_seconds"]))
    x = doc["full_graph_extrapolation"]
    assert x["acdc_full_graph_seconds_estimate"] == pytest.approx(
        x["acdc_seconds_per_restricted_edge"] * EdgeGraph(2, 4).n_edges)
    matched = doc["acdc"]["runs"][doc["acdc"]["matched_index"]]
    assert x["acdc_full_graph_seconds_depth_weighted"] == pytest.approx(matched["seconds"] * x["depth_weight_factor"])
    assert doc["eap_ig"]["backward_from_layer"] == 1 == doc["eap"]["backward_from_layer"]
    assert x["ours_full_graph"]["eap_ig_seconds"] != doc["eap_ig"]["seconds"]  # full-depth EAP-IG timed apart
    full = {r["method"].split(" ")[0]: r for r in doc["full_graph"]}
    assert list(full) == ["acdc", "eap", "eap-ig", "ours", "exhaustive"]
    assert full["acdc"]["seconds"] == pytest.approx(x["acdc_full_graph_seconds_depth_weighted"])
    assert full["exhaustive"]["seconds"] == pytest.approx(doc["exhaustive"]["seconds"] * x["depth_weight_factor"])
    assert full["ours"]["seconds"] == x["ours_full_graph"]["seconds"] and full["ours"]["ratio_to_ours"] == 1.0
    assert [r["measured"] for r in full.values()] == [False, True, True, True, False]
    md = (out / BENCHMARK_MD).read_text()
    assert "Every method on the full graph" in md
    assert TIMINGS_JSON in md and TABLE_CSV in md and f"{h['ratio']:.3f}" in md
    assert r"\begin{tabular}" in (out / TABLE_TEX).read_text()


def test_exhaustive_reference_equals_direct_single_edge_removals(tiny_llama, batch, result):
    doc, _ = result
    g = EdgeGraph.from_cfg(tiny_llama.cfg)
    restriction = EdgeRestriction.build(g, RestrictionConfig(last_layers=1))
    effects, m_full, n_fwd = exhaustive_effects(tiny_llama, batch, restriction, max_batch_rows=12)
    ev = CircuitEvaluator(tiny_llama, batch, g)
    assert m_full == pytest.approx(ev.m_full, abs=1e-10)
    for s, r in restriction.mask.nonzero().tolist():
        kept = g.valid.clone()
        kept[s, r] = False
        assert float(effects[s, r]) == pytest.approx(ev.metric(kept) - ev.m_full, abs=1e-10)
    assert torch.isnan(effects[~restriction.mask]).all()
    assert n_fwd < restriction.n_edges  # several edges per forward
    assert effects[restriction.mask].abs().max() > 1e-3  # the removals do something
    # the stage's reference equals this one: same positives count as our circuit size
    assert doc["exhaustive"]["n_positives"] == doc["ours"]["n_edges"]


def test_restricted_faithfulness_is_zero_without_and_one_with_all_restricted_edges(tiny_llama, batch, result):
    g = EdgeGraph.from_cfg(tiny_llama.cfg)
    restriction = EdgeRestriction.build(g, RestrictionConfig(last_layers=1))
    ev = RestrictedEvaluator(CircuitEvaluator(tiny_llama, batch, g), restriction)
    assert ev.faithfulness(torch.zeros_like(g.valid)) == pytest.approx(0.0, abs=1e-12)
    assert ev.faithfulness(restriction.mask) == pytest.approx(1.0, abs=1e-12)
    doc, _ = result
    ours = doc["ours"]
    assert ours["faithfulness"] >= 0.8 > ours["faithfulness_one_fewer"]
    # a curve point equals a direct exact evaluation with every unrestricted edge kept
    point = doc["curves"]["eap-ig"][6]
    direct = CircuitEvaluator(tiny_llama, batch, g)
    from mechflow.circuits.eap import edge_scores
    order = restriction.ranked(restriction.restrict_scores(
        edge_scores(tiny_llama, batch, "eap-ig", steps=3, graph=g)).nan_to_num(0.0))
    k = int(point["percent"] / 100 * restriction.n_edges)
    assert point["n_edges"] == k
    m = direct.metric(restriction.full_kept(prefix_mask(order, k, g)))
    assert point["faithfulness"] == pytest.approx((m - ev.m_empty) / (ev.m_full - ev.m_empty), abs=1e-10)


@pytest.mark.parametrize("spec", [RestrictionConfig(last_layers=1), RestrictionConfig(),
                                  RestrictionConfig(last_layers=2, sender_last_layers=1)])
def test_resumed_evaluator_equals_the_full_forward_evaluator(tiny_llama, batch, spec):
    """Our search's evaluator (started mid-model from the cached clean state) = `RestrictedEvaluator`."""
    g = EdgeGraph.from_cfg(tiny_llama.cfg)
    restriction = EdgeRestriction.build(g, spec)
    slow = RestrictedEvaluator(CircuitEvaluator(tiny_llama, batch, g), restriction)
    fast = ResumedRestrictedEvaluator(tiny_llama, batch, restriction)
    assert fast.m_full == pytest.approx(slow.m_full, abs=1e-10)
    assert fast.m_empty == pytest.approx(slow.m_empty, abs=1e-10)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        kept = (torch.rand(g.valid.shape, generator=gen) < 0.5) & restriction.mask
        assert fast.metric(kept) == pytest.approx(slow.metric(kept), abs=1e-9)
    assert fast.n_evaluations == 4


def test_perfect_scorer_has_auc_one_and_auc_matches_trapezoid_of_the_roc(tiny_llama, batch):
    g = EdgeGraph.from_cfg(tiny_llama.cfg)
    restriction = EdgeRestriction.build(g, RestrictionConfig(last_layers=1))
    effects, _, _ = exhaustive_effects(tiny_llama, batch, restriction)
    positives = reference_positives(effects, restriction, 5, None, 1.0)
    assert int(positives.sum()) == 5
    assert roc_auc(*ranking_inputs(effects, positives, restriction)) == 1.0
    assert roc_auc(*ranking_inputs(1.0 / effects.abs(), positives, restriction)) == 0.0
    noisy = effects.abs() + torch.rand(effects.shape, generator=torch.Generator().manual_seed(1)).double()
    pts = list(zip(*roc_curve(*ranking_inputs(noisy, positives, restriction))))
    assert roc_auc(*ranking_inputs(noisy, positives, restriction)) == pytest.approx(step_auc(pts), abs=1e-12)
    thr = reference_positives(effects, restriction, 0, 0.05, 2.0)
    assert torch.equal(thr, restriction.mask & (effects.nan_to_num(0).abs() > 0.1))


def test_step_auc_of_known_points():
    assert step_auc([]) == pytest.approx(0.5)
    assert step_auc([(0.5, 1.0)]) == pytest.approx(0.75)
    assert step_auc([(0.0, 1.0)]) == pytest.approx(1.0)
    assert step_auc([(0.2, 0.4), (0.6, 0.9)]) == pytest.approx(0.2 * 0.2 + 0.4 * 0.65 + 0.4 * 0.95)


def test_same_inputs_give_the_same_table_except_timings(tiny_llama, result, tmp_path):
    """Also: each file goes to exactly the path its keyword names (here not the default names)."""
    _, first = result
    named = {name: tmp_path / name / f"custom_{file}" for name, file in BENCHMARK_OUTPUTS.items()}
    compare_methods(tiny_llama, pairs(0), BenchmarkConfig.from_dict(CFG), **named)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(BENCHMARK_OUTPUTS)
    for name, path in named.items():
        assert [p.name for p in path.parent.iterdir()] == [path.name], name
    a, b = read_table(first / TABLE_CSV), read_table(named["table"])
    strip = [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in a]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in b]


@pytest.mark.parametrize("bad", [
    {"acdc": {"thresholds": []}},
    {"target": 1.5},
    {"percentages": [10, 1]},
    {"reference_threshold": -1},
    {"acdc_match": "best"},
    {"typo": 1},
    {"compare": {"target": 0.8}},  # the nested block of earlier versions: an unknown key now
])
def test_bad_config_raises_config_error_and_writes_nothing(tmp_path, bad):
    with pytest.raises(ConfigError, match=rf"benchmark\.{next(iter(bad))}"):
        benchmark(bad, model_cfg={}, dataset=tmp_path / "missing.jsonl", **benchmark_outputs(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def _dataset(path, model_name: str, n: int = 5, pos: int = 6):
    return write_tiny_task_dataset(path, model_name, n, pos)


def test_stage_reads_the_dataset_and_records_prompt_ids(tiny_llama, tmp_path):
    from types import SimpleNamespace

    from mechflow.errors import DataError

    loaded = SimpleNamespace(model=tiny_llama, card=SimpleNamespace(name="tiny"))
    data = _dataset(tmp_path / "dataset.jsonl", "tiny")
    doc = benchmark(CFG, model_cfg={"name": "tiny"}, dataset=data, **benchmark_outputs(tmp_path / "out"),
                    model=loaded)
    assert doc["prompt_ids"] == ["e0", "e1", "e2", "e3"] and doc["task"] == "t"
    assert json.loads((tmp_path / "out" / TIMINGS_JSON).read_text())["prompt_ids"] == doc["prompt_ids"]
    assert (tmp_path / "out" / BENCHMARK_MD).exists()
    other = _dataset(tmp_path / "other" / "dataset.jsonl", "someone_else")
    with pytest.raises(DataError, match="tokenized for model"):
        benchmark(CFG, model_cfg={}, dataset=other, **benchmark_outputs(tmp_path / "out2"), model=loaded)
    assert not (tmp_path / "out2").exists()
