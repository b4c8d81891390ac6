"""Attention patterns, rollout (hand-computed) and flow (brute-force min cut)."""

from __future__ import annotations

import itertools

import networkx as nx
import pytest
import torch

from mechflow.attribution.attention import (
    attention_flow,
    attention_patterns,
    attention_rollout,
    flow_graph,
    max_flow_value,
)

# Layer 0: one head; layer 1: two heads averaging to [[1, 0], [0.2, 0.8]].
HAND = torch.tensor([
    [[[1.0, 0.0], [0.5, 0.5]], [[1.0, 0.0], [0.5, 0.5]]],
    [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.4, 0.6]]],
], dtype=torch.float64)  # [L=2, H=2, q, k]


def test_patterns_match_cache_and_rows_sum_to_one(tiny_llama):
    toks = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    pats = attention_patterns(tiny_llama, toks)
    _, cache = tiny_llama.run_with_cache(toks)
    assert pats.shape == (2, 2, 4, 6, 6)
    torch.testing.assert_close(pats[:, 1], cache["blocks.1.attn.hook_pattern"], rtol=0, atol=0)
    torch.testing.assert_close(pats.sum(-1), torch.ones(2, 2, 4, 6, dtype=pats.dtype))
    assert attention_patterns(tiny_llama, toks, layers=[0]).shape == (2, 1, 4, 6, 6)


def test_rollout_hand_computed_two_layers():
    r = attention_rollout(HAND)
    # Â_0 = [[1, 0], [.25, .75]], Â_1 = [[1, 0], [.1, .9]], R_1 = Â_1 Â_0.
    torch.testing.assert_close(r[0], torch.tensor([[1.0, 0.0], [0.25, 0.75]], dtype=torch.float64))
    torch.testing.assert_close(r[1], torch.tensor([[1.0, 0.0], [0.325, 0.675]], dtype=torch.float64))


def test_rollout_rows_sum_to_one_on_model(tiny_llama):
    toks = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(1))
    r = attention_rollout(attention_patterns(tiny_llama, toks))
    assert r.shape == (3, 2, 9, 9)
    torch.testing.assert_close(r.sum(-1), torch.ones(3, 2, 9, dtype=r.dtype))
    assert torch.all(r.triu(1) == 0)  # causal


def test_flow_hand_computed_two_layers():
    flow = attention_flow(HAND)  # [q, k]
    # Into output 1: from token 0 via (1,0) min(1, .1) + via (1,1) min(.25, .9) = .35; token 1: .75.
    torch.testing.assert_close(flow[1], torch.tensor([0.35, 0.75], dtype=torch.float64))
    torch.testing.assert_close(flow[0], torch.tensor([1.0, 0.0], dtype=torch.float64))


def _brute_force_min_cut(g: nx.DiGraph, s, t) -> float:
    others = [v for v in g.nodes if v not in (s, t)]
    best = float("inf")
    for bits in itertools.product([0, 1], repeat=len(others)):
        side = {s} | {v for v, b in zip(others, bits) if b}
        cut = sum(d["capacity"] for u, v, d in g.edges(data=True) if u in side and v not in side)
        best = min(best, cut)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_max_flow_equals_brute_force_min_cut(seed):
    pats = torch.rand(3, 2, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tril()
    pats = pats / pats.sum(-1, keepdim=True)
    a = attention_rollout(pats)  # exercise the same normalisation path
    assert a.shape == (3, 3, 3)
    flow = attention_flow(pats)
    from mechflow.attribution.attention import residual_attention

    g = flow_graph(residual_attention(pats))
    for q in range(3):
        for k in range(3):
            ref = _brute_force_min_cut(g, (0, k), (3, q)) if (0, k) in g and (3, q) in g else 0.0
            assert abs(max_flow_value(g, (0, k), (3, q)) - ref) < 1e-9
            assert abs(float(flow[q, k]) - ref) < 1e-9
