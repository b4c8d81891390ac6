"""MIB edge graph: counts from configs only, names, validity rule."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mechflow.circuits.graph import EdgeGraph


def brute_force_edges(n_layers: int, n_heads: int) -> set[str]:
    """Enumerate edges straight from the rule (independent of EdgeGraph's index arithmetic)."""
    senders = [("input", -1, "input")] + [(f"a{L}.h{h}", L, "head") for L in range(n_layers) for h in range(n_heads)] \
        + [(f"m{L}", L, "mlp") for L in range(n_layers)]
    receivers = [(f"a{L}.h{h}<{k}>", L, "head") for L in range(n_layers) for h in range(n_heads) for k in "qkv"] \
        + [(f"m{L}", L, "mlp") for L in range(n_layers)] + [("logits", n_layers, "logits")]
    edges = set()
    for s, ls, sk in senders:
        for r, lr, rk in receivers:
            if sk == "input" or rk == "logits":
                ok = True
            elif sk == "head":
                ok = lr > ls or (rk == "mlp" and lr == ls)
            else:  # mlp sender
                ok = lr > ls
            if ok:
                edges.add(f"{s}->{r}")
    return edges


@pytest.mark.parametrize("cfg, expected", [
    (SimpleNamespace(n_layers=30, n_heads=9), 123_211),   # SmolLM2-135M (MIB-style count)
    (SimpleNamespace(n_layers=12, n_heads=12), 32_491),   # GPT-2 small (MIB EDGE_COUNTS["gpt2"])
])
def test_edge_count_from_config_only(cfg, expected):
    g = EdgeGraph.from_cfg(cfg)
    assert g.n_edges == expected
    assert int(g.valid.sum()) == expected


def test_valid_mask_matches_rule_by_brute_force():
    g = EdgeGraph(4, 3)
    assert set(g.edge_names(g.valid)) == brute_force_edges(4, 3)


def test_names_and_membership():
    g = EdgeGraph(8, 4)
    for name in ["a3.h1->a7.h2<v>", "m4->logits", "input->a0.h0<q>", "a3.h1->m3", "m2->a3.h0<k>"]:
        s, r = g.edge_index(name)
        assert g.edge_name(s, r) == name
    for name in ["a3.h1->a3.h2<q>", "m3->m3", "m3->a3.h0<q>", "a4.h0->m3"]:
        with pytest.raises(KeyError):
            g.edge_index(name)
    mask = g.mask_from_names(["a3.h1->a7.h2<v>", "m4->logits"])
    assert g.nodes_of(mask) == ["a3.h1", "m4", "a7.h2", "logits"]
    assert g.edge_names(mask) == ["a3.h1->a7.h2<v>", "m4->logits"]
    assert torch.equal(g.mask_from_names(g.edge_names(mask)), mask)
