"""Exact faithfulness, sufficiency/comprehensiveness, CPR/CMD and the minimal-circuit search."""

from __future__ import annotations

import pytest
import torch
from circuit_fixtures import pairs

from mechflow.circuits.config import CircuitConfig
from mechflow.circuits.eap import edge_scores
from mechflow.circuits.faithfulness import (
    CircuitEvaluator,
    CurvePoint,
    area_metrics,
    faithfulness_curve,
    prefix_mask,
    ranked_edges,
    sufficiency_comprehensiveness,
)
from mechflow.circuits.result import tl_edge_patched_logits
from mechflow.circuits.search import minimal_faithful_prefix
from mechflow.errors import ConfigError


@pytest.fixture(scope="module")
def setup(tiny_llama):
    b = pairs(7, n=4)
    ev = CircuitEvaluator(tiny_llama, b)
    order = ranked_edges(edge_scores(tiny_llama, b, "eap-ig", steps=3, graph=ev.graph), ev.graph)
    return b, ev, order


def test_endpoints_are_clean_and_corrupted_runs(tiny_llama, setup):
    b, ev, _ = setup
    with torch.no_grad():
        assert ev.m_full == pytest.approx(b.metric(tiny_llama(b.clean_tokens)).mean().item(), abs=1e-12)
        assert ev.m_empty == pytest.approx(b.metric(tiny_llama(b.corrupted_tokens)).mean().item(), abs=1e-12)
    assert ev.faithfulness(ev.graph.valid) == pytest.approx(1.0, abs=1e-12)
    assert ev.faithfulness(torch.zeros_like(ev.graph.valid)) == pytest.approx(0.0, abs=1e-12)


def test_sufficiency_and_comprehensiveness_by_direct_patching(tiny_llama, setup):
    b, ev, order = setup
    kept = prefix_mask(order, 30, ev.graph)
    out = sufficiency_comprehensiveness(ev, kept)

    def m(removed):
        return b.metric(tl_edge_patched_logits(tiny_llama, b.clean_tokens, b.corrupted_tokens, removed)).mean().item()

    def f(x):
        return (x - ev.m_empty) / (ev.m_full - ev.m_empty)

    assert out["sufficiency"] == pytest.approx(f(m(ev.graph.valid & ~kept)), abs=1e-10)
    assert out["comprehensiveness"] == pytest.approx(1 - f(m(kept)), abs=1e-10)
    s, c = (min(max(out[k], 0.0), 1.0) for k in ("sufficiency", "comprehensiveness"))
    assert out["f1"] == pytest.approx(2 * s * c / (s + c) if s + c > 0 else 0.0)


def test_curve_budgets_and_areas(setup):
    _, ev, order = setup
    pts = faithfulness_curve(ev, order)
    assert [p.n_edges for p in pts] == [int(p / 100 * 110) for p in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)]
    assert pts[-1].faithfulness == pytest.approx(1.0, abs=1e-12)
    # hand-computed trapezoids on x = fraction of edges (MIB area_under / area_from_1)
    toy = [CurvePoint(10, 0, 0, 0.0), CurvePoint(50, 0, 0, 0.5), CurvePoint(100, 0, 0, 1.2)]
    a = area_metrics(toy)
    assert a["cpr"] == pytest.approx(0.4 * 0.25 + 0.5 * 0.85)
    assert a["cmd"] == pytest.approx(0.4 * 0.75 + 0.5 * 0.35)


def test_minimal_prefix_is_a_verified_boundary(setup):
    _, ev, order = setup
    target = 0.8
    res = minimal_faithful_prefix(ev, order, target)

    def f(k):
        return ev.faithfulness(prefix_mask(order, k, ev.graph))

    assert res.faithfulness == pytest.approx(f(res.n_edges), abs=1e-12) and res.faithfulness >= target
    assert res.faithfulness_one_fewer == pytest.approx(f(res.n_edges - 1), abs=1e-12)
    assert res.faithfulness_one_fewer < target
    assert all(p.faithfulness < target for p in res.curve if p.n_edges < res.n_edges)
    brute = [k for k in range(ev.graph.n_edges + 1) if f(k) >= target]
    assert res.n_edges in brute and res.n_evaluations < 40
    # if f were monotone on this ranking, bisection finds the global minimum
    if all(k in brute for k in range(brute[0], ev.graph.n_edges + 1)):
        assert res.n_edges == brute[0]


@pytest.mark.parametrize("target", [0, -0.1, 1.5, float("nan"), True])
def test_target_outside_unit_interval_is_config_error(setup, target):
    _, ev, order = setup
    with pytest.raises(ConfigError, match="circuits.target") as library:
        minimal_faithful_prefix(ev, order, target)
    with pytest.raises(ConfigError, match="circuits.target") as config:
        CircuitConfig(target=target)
    assert str(library.value) == str(config.value)  # one check: the library call runs the config's own


def test_config_validation():
    assert CircuitConfig.from_dict({"target": 1.0, "percentages": [1, 50, 100]}).percentages == (1.0, 50.0, 100.0)
    for bad in [{"method": "acdc"}, {"ig_steps": 0}, {"ig_rule": "simpson"}, {"percentages": [5, 1]}, {"nope": 1}]:
        with pytest.raises(ConfigError, match="circuits\\."):
            CircuitConfig.from_dict(bad)
