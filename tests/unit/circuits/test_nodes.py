"""Node circuits: scores, exact evaluation, minimal search and circuit.json, on a tiny llama and a tiny Gemma-3."""

from __future__ import annotations

import pytest
import torch
from circuit_fixtures import make_tiny_gemma, pairs, spec

from mechflow.attribution.patching import exact_patching
from mechflow.circuits.config import CircuitConfig
from mechflow.circuits.core import discover_circuit, resolve_unit
from mechflow.circuits.eap import edge_scores
from mechflow.circuits.faithfulness import CircuitEvaluator, normalized_faithfulness
from mechflow.circuits.forward import graph_forward
from mechflow.circuits.graph import EdgeGraph
from mechflow.circuits.nodes import NodeEvaluator, node_scores, ranked_nodes
from mechflow.circuits.result import (
    CircuitFile,
    read_circuit,
    reevaluate_circuit,
    tl_node_patched_logits,
    write_circuit,
)
from mechflow.errors import ConfigError


@pytest.fixture(scope="module")
def tiny_gemma():
    return make_tiny_gemma(seed=2)


def _hooked_metric(model, b, kept) -> float:
    """Independent evaluation: per-head hook_result / hook_mlp_out patching (`tl_node_patched_logits`)."""
    return float(b.metric(tl_node_patched_logits(model, b.clean_tokens, b.corrupted_tokens, kept)).double().mean())


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_node_scores_are_row_sums_of_edge_scores(tiny_llama, method):
    """On an additive model patching a node = removing all its out-edges, so the node score is the
    sum of its outgoing edge scores (an independent implementation: `graph_forward` receivers)."""
    b = pairs(5, n=3)
    g = EdgeGraph.from_cfg(tiny_llama.cfg)
    edges = edge_scores(tiny_llama, b, method, steps=4, graph=g)
    nodes = node_scores(tiny_llama, b, method, steps=4, graph=g)
    torch.testing.assert_close(nodes, edges.sum(1), rtol=1e-9, atol=1e-12)
    assert nodes.abs().max() > 1e-3


@torch.no_grad()
def test_node_evaluation_matches_edge_removal_and_result_hooks(tiny_llama):
    """Three implementations agree: hook_z patching (search), hook_result patching (re-evaluation) and
    the edge graph with every out-edge of the patched nodes removed (`graph_forward`)."""
    b = pairs(6, n=3)
    g = EdgeGraph.from_cfg(tiny_llama.cfg)
    nodes, edges = NodeEvaluator(tiny_llama, b, g), CircuitEvaluator(tiny_llama, b, g, last_position_only=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        kept = torch.rand(g.n_senders, generator=gen) < 0.5
        ours = nodes.metric_per_prompt(kept)
        via_edges = edges.metric_per_prompt(g.valid & kept[:, None])  # removed = all out-edges of dropped nodes
        torch.testing.assert_close(ours, via_edges, rtol=0, atol=1e-10)
        assert float(ours.double().mean()) == pytest.approx(_hooked_metric(tiny_llama, b, kept), abs=1e-10)
    assert nodes.m_full == pytest.approx(float(b.metric(tiny_llama(b.clean_tokens)).double().mean()), abs=1e-12)
    assert nodes.m_empty == pytest.approx(float(b.metric(tiny_llama(b.corrupted_tokens)).double().mean()), abs=1e-12)


@torch.no_grad()
def test_gemma_like_node_patching_is_exact(tiny_gemma):
    """Post-norm model: edges are refused, nodes are evaluated exactly (against hook_result patching,
    single-node exact patching of `mechflow.attribution`, and the clean / corrupted runs)."""
    b = pairs(7, n=3)
    g = EdgeGraph.from_cfg(tiny_gemma.cfg)
    with pytest.raises(ConfigError, match="post-norms"):
        graph_forward(tiny_gemma, b.clean_tokens)
    ev = NodeEvaluator(tiny_gemma, b, g)
    assert ev.m_full == pytest.approx(float(b.metric(tiny_gemma(b.clean_tokens)).double().mean()), abs=1e-12)
    assert ev.m_empty == pytest.approx(float(b.metric(tiny_gemma(b.corrupted_tokens)).double().mean()), abs=1e-12)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        kept = torch.rand(g.n_senders, generator=gen) < 0.5
        assert ev.metric(kept) == pytest.approx(_hooked_metric(tiny_gemma, b, kept), abs=1e-10)
    heads = exact_patching(tiny_gemma, b, "head", per_prompt=True)  # [L, H, n]
    mlps = exact_patching(tiny_gemma, b, "mlp", per_prompt=True)  # [L, n]
    base = ev.metric_per_prompt(ev.universe)
    for L in range(g.n_layers):
        for h in range(g.n_heads):
            one = ev.universe.clone()
            one[g.head_sender(L, h)] = False
            torch.testing.assert_close(ev.metric_per_prompt(one) - base, heads[L, h], rtol=0, atol=1e-10)
        one = ev.universe.clone()
        one[g.mlp_sender(L)] = False
        torch.testing.assert_close(ev.metric_per_prompt(one) - base, mlps[L], rtol=0, atol=1e-10)
    assert heads.abs().max() > 1e-3


def test_node_scores_first_order_on_gemma_like(tiny_gemma):
    """EAP node score = first-order Taylor term of the exact single-node patch: it matches the
    finite-difference derivative along the node's corrupted-minus-clean direction."""
    b = pairs(8, n=2)
    g = EdgeGraph.from_cfg(tiny_gemma.cfg)
    eap = node_scores(tiny_gemma, b, "eap", graph=g)
    from mechflow.circuits.nodes import cache_nodes

    clean, corr = cache_nodes(tiny_gemma, b.clean_tokens), cache_nodes(tiny_gemma, b.corrupted_tokens)
    eps = 1e-6
    for L, h in ((0, 1), (1, 3)):
        name = f"blocks.{L}.attn.hook_z"
        step = clean[name].clone()
        step[:, :, h] += eps * (corr[name][:, :, h] - clean[name][:, :, h])
        hook = [(name, lambda act, hook, v=step: v.clone())]
        with torch.no_grad():
            moved = float(b.metric(tiny_gemma.run_with_hooks(b.clean_tokens, fwd_hooks=hook)).double().mean())
            m0 = float(b.metric(tiny_gemma(b.clean_tokens)).double().mean())
        assert float(eap[g.head_sender(L, h)]) == pytest.approx((moved - m0) / eps, rel=1e-4, abs=1e-8)


def _independent_f(model, b, kept, m_full, m_empty) -> float:
    return normalized_faithfulness(_hooked_metric(model, b, kept), m_full, m_empty)


@pytest.mark.parametrize("which", ["llama", "gemma"])
def test_node_circuit_search_is_minimal_exact_and_recomputable(tiny_llama, tiny_gemma, tmp_path, which):
    model = tiny_llama if which == "llama" else tiny_gemma
    b = pairs(9, n=3)
    cfg = CircuitConfig(unit="nodes", target=0.8, ig_steps=3, percentages=(5, 10, 20, 50, 100))
    doc, scores = discover_circuit(model, b, cfg, model_cfg={"name": f"tiny_{which}", "dtype": "float64"},
                                   metric_spec=spec(), prompt_ids=["a", "b", "c"])
    g = EdgeGraph.from_cfg(model.cfg)
    assert doc.unit == "nodes" and doc.edges == [] and doc.n_edges is None and doc.n_units_total == g.n_senders
    assert len(doc.nodes) == doc.n_units == len(doc.node_scores)
    order = ranked_nodes(scores)
    assert doc.nodes == [g.sender_names[i] for i in order[:doc.n_units].tolist()]

    def prefix(k: int) -> torch.Tensor:
        kept = torch.zeros(g.n_senders, dtype=torch.bool)
        kept[order[:k]] = True
        return kept

    m_full = _hooked_metric(model, b, torch.ones(g.n_senders, dtype=torch.bool))
    m_empty = _hooked_metric(model, b, torch.zeros(g.n_senders, dtype=torch.bool))
    assert (doc.m_full, doc.m_empty) == pytest.approx((m_full, m_empty), abs=1e-10)
    k = doc.n_units
    f_k = _independent_f(model, b, prefix(k), m_full, m_empty)
    assert doc.faithfulness == pytest.approx(f_k, abs=1e-9) and f_k >= 0.8
    f_before = _independent_f(model, b, prefix(k - 1), m_full, m_empty)
    assert f_before < 0.8 and doc.faithfulness_one_fewer == pytest.approx(f_before, abs=1e-9)
    # no smaller grid budget reaches the target; every curve point is exact
    for p in doc.curve:
        assert p.n_units == int(p.percent / 100 * g.n_senders)
        assert p.faithfulness == pytest.approx(_independent_f(model, b, prefix(p.n_units), m_full, m_empty), abs=1e-9)
        if p.n_units < k:
            assert p.faithfulness < 0.8
    without = torch.ones(g.n_senders, dtype=torch.bool) & ~prefix(k)
    assert doc.comprehensiveness == pytest.approx(1 - _independent_f(model, b, without, m_full, m_empty), abs=1e-9)
    # the file alone reproduces f
    path = write_circuit(tmp_path / "circuit.json", doc)
    back = read_circuit(path)
    assert back == doc
    again = reevaluate_circuit(path, model=model)
    for key in ("m_full", "m_empty", "m_circuit", "faithfulness"):
        assert again[key] == pytest.approx(getattr(back, key), abs=1e-10), key


def test_unit_resolution(tiny_llama, tiny_gemma):
    assert resolve_unit("auto", tiny_llama, {"name": "x", "edge_circuits": True}) == "edges"
    assert resolve_unit("auto", tiny_llama, {"name": "x", "edge_circuits": False}) == "nodes"
    assert resolve_unit("auto", tiny_gemma, {"name": "x"}) == "nodes"
    assert resolve_unit("nodes", tiny_llama, {"name": "x"}) == "nodes"
    with pytest.raises(ConfigError, match="circuits.unit.*post-norms|post-norms.*circuits.unit"):
        resolve_unit("edges", tiny_gemma, {"name": "x"})
    with pytest.raises(ConfigError, match="circuits.unit: 'edges'.*edge_circuits is false"):
        resolve_unit("edges", tiny_llama, {"name": "x", "edge_circuits": False})
    with pytest.raises(ConfigError, match="circuits.unit"):
        CircuitConfig(unit="heads")
    with pytest.raises(ConfigError, match="circuits.unit: 'heads' is not one of"):  # the config's own check
        resolve_unit("heads", tiny_llama, {"name": "x"})


def test_node_file_must_not_list_edges(tiny_llama):
    b = pairs(10, n=2)
    doc, _ = discover_circuit(tiny_llama, b, CircuitConfig(unit="nodes", ig_steps=2, percentages=(50, 100)),
                              model_cfg={"name": "tiny"}, metric_spec=spec(2))
    bad = doc.model_dump()
    bad["edges"] = [{"name": "input->logits", "score": 1.0}]
    with pytest.raises(ValueError, match="node circuit lists no edges"):
        CircuitFile.model_validate(bad)
