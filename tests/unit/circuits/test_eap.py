"""EAP / EAP-IG edge scores against exact edge patching (linear case) and finite differences."""

from __future__ import annotations

import pytest
import torch
from circuit_fixtures import make_linear_tail, pairs

from mechflow.circuits.eap import edge_scores
from mechflow.circuits.faithfulness import CircuitEvaluator
from mechflow.circuits.forward import graph_forward
from mechflow.circuits.graph import EdgeGraph
from mechflow.errors import ConfigError


@pytest.fixture(scope="module", name="linear_tail")
def _linear_tail():
    return make_linear_tail()


def test_eap_equals_exact_edge_patching_where_metric_is_linear(linear_tail):
    """With ln_final = identity the logit-difference metric is linear in the logits receiver, so
    removing s->logits changes m by exactly diff_s . dm/dinput: EAP and EAP-IG are exact there."""
    b = pairs(4)
    g = EdgeGraph.from_cfg(linear_tail.cfg)
    ev = CircuitEvaluator(linear_tail, b, g)
    eap = edge_scores(linear_tail, b, "eap", graph=g)
    ig = edge_scores(linear_tail, b, "eap-ig", steps=3, graph=g)
    r = g.logits_receiver
    for s in range(g.n_senders):
        kept = g.valid.clone()
        kept[s, r] = False
        exact = ev.metric(kept) - ev.m_full
        assert eap[s, r].item() == pytest.approx(exact, abs=1e-10)
        assert ig[s, r].item() == pytest.approx(exact, abs=1e-10)
    # elsewhere the model is nonlinear: EAP is only an approximation there
    s, rq = g.edge_index("input->a1.h0<q>")
    kept = g.valid.clone()
    kept[s, rq] = False
    assert abs(eap[s, rq].item() - (ev.metric(kept) - ev.m_full)) > 1e-6


@pytest.mark.parametrize("edge", ["input->a1.h2<k>", "a0.h1->a1.h3<v>", "a0.h0->m0", "m0->a1.h0<q>", "a1.h2->logits"])
def test_eap_is_directional_derivative_by_finite_differences(tiny_llama, edge):
    b = pairs(5)
    g = EdgeGraph.from_cfg(tiny_llama.cfg)
    eap = edge_scores(tiny_llama, b, "eap", graph=g)
    s, r = g.edge_index(edge)
    with torch.no_grad():
        _, clean = graph_forward(tiny_llama, b.clean_tokens, g, record=True)
        _, corr = graph_forward(tiny_llama, b.corrupted_tokens, g, record=True)
    removed = torch.zeros_like(g.valid)
    removed[s, r] = True
    eps = 1e-6

    def m(e):
        with torch.no_grad():
            logits, _ = graph_forward(tiny_llama, b.clean_tokens, g, corrupted=clean + e * (corr - clean),
                                      removed=removed)
        return b.metric(logits).mean().item()

    fd = (m(eps) - m(-eps)) / (2 * eps)
    assert eap[s, r].item() == pytest.approx(fd, rel=1e-6, abs=1e-9)
    assert abs(fd) > 1e-5


def test_eap_ig_one_left_point_is_eap_and_invalid_edges_are_zero(tiny_llama):
    b = pairs(6)
    g = EdgeGraph.from_cfg(tiny_llama.cfg)
    eap = edge_scores(tiny_llama, b, "eap", graph=g)
    torch.testing.assert_close(edge_scores(tiny_llama, b, "eap-ig", steps=1, rule="left", graph=g), eap)
    assert eap[~g.valid].abs().max() == 0
    assert eap[g.valid].abs().min() >= 0 and (eap[g.valid] != 0).float().mean() > 0.9
    ig5 = edge_scores(tiny_llama, b, "eap-ig", steps=5, graph=g)
    assert (ig5 - eap).abs().max() > 1e-6
    with pytest.raises(ConfigError, match="circuits.method"):
        edge_scores(tiny_llama, b, "acdc")


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_from_layer_stops_the_backward_without_changing_later_scores(method):
    """Scores into receivers of layers >= from_layer equal the full computation; earlier ones are 0."""
    from mechflow.testing import make_tiny_llama

    model = make_tiny_llama(n_layers=3, seed=3)
    b = pairs(4)
    g = EdgeGraph.from_cfg(model.cfg)
    full = edge_scores(model, b, method, steps=3, graph=g)
    for layer in (1, 2):
        cut = edge_scores(model, b, method, steps=3, graph=g, from_layer=layer)
        first = g.first_receiver(layer)
        torch.testing.assert_close(cut[:, first:], full[:, first:], rtol=1e-9, atol=1e-12)
        assert cut[:, :first].abs().max() == 0
        assert full[:, :first].abs().max() > 0


def test_graph_forward_rejects_a_grad_layer_outside_the_model(tiny_llama):
    b = pairs(2)
    with pytest.raises(ValueError, match="grad_from_layer"):
        graph_forward(tiny_llama, b.clean_tokens, grad_from_layer=tiny_llama.cfg.n_layers)
