"""Attribution-graph edges against the exact reference: the frozen replacement system run forward.

As circuit-tracer's own tests (`tests/test_attributions_*.py`, `verify_feature_edges` /
`verify_token_and_error_edges`), adding a node's output once more (doubling it) with attention
patterns, norm scales and every other node frozen must change each feature's pre-activation and
each logit node's demeaned logit by exactly that node's adjacency column. On the tiny float64 model
that holds to 1e-9; on SmolLM2 (float32) to 1e-4, and the replacement reproduces its logits.
"""

from __future__ import annotations

import pytest
import torch

from mechflow.errors import ConfigError
from mechflow.graphs.attribution import attribute_prompt, salient_logits
from mechflow.graphs.replacement import Perturbation, TranscoderSet, frozen_forward, setup_prompt
from mechflow.testing import make_random_transcoders, make_tiny_llama

TOKENS = torch.tensor([1, 7, 23, 4, 41, 9, 16, 30])


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llama(n_layers=3)


def node_output(graph, state, transcoders, column: int) -> Perturbation:
    """The output vector of the node of ``column`` (feature, error or token), as a perturbation."""
    layout, P = graph.layout, graph.n_pos
    d = state.errors.shape[-1]
    if column < layout.n_features:
        layer, pos, f = graph.active_features[graph.selected_features[column]].tolist()
        extra = torch.zeros(P, d, dtype=state.errors.dtype)
        extra[pos] = state.activations[layer, pos, f] * transcoders.transcoders[layer].W_dec[f]
        return Perturbation(mlp={layer: extra})
    if column < layout.tokens.start:
        layer, pos = divmod(column - layout.n_features, P)
        extra = torch.zeros(P, d, dtype=state.errors.dtype)
        extra[pos] = state.errors[layer, pos]
        return Perturbation(mlp={layer: extra})
    pos = column - layout.tokens.start
    extra = torch.zeros(P, d, dtype=state.errors.dtype)
    extra[pos] = state.token_vectors[pos]
    return Perturbation(embed=extra)


def targets(graph, out, model, transcoders) -> torch.Tensor:
    """Pre-activations of the graph's feature nodes and demeaned logits of its logit nodes."""
    pre = out.pre_acts(transcoders)
    feats = graph.active_features[graph.selected_features]
    values = pre[feats[:, 0], feats[:, 1], feats[:, 2]]
    demeaned = out.logits[-1] - out.logits[-1].mean()
    return torch.cat([values, demeaned[graph.logit_tokens]])


def check_doubling(model, transcoders, graph, state, columns, atol):
    base = targets(graph, frozen_forward(model, transcoders, state), model, transcoders)
    rows = torch.cat([torch.arange(graph.layout.n_features), torch.arange(graph.layout.logits.start,
                                                                           graph.layout.n_nodes)])
    worst = 0.0
    for column in columns:
        extra = node_output(graph, state, transcoders, column)
        moved = targets(graph, frozen_forward(model, transcoders, state, extra), model, transcoders)
        predicted = graph.adjacency[rows, column]
        torch.testing.assert_close(moved - base, predicted.to(moved.dtype), atol=atol, rtol=1e-4,
                                   msg=lambda m, c=column: f"column {c}: {m}")
        worst = max(worst, float((moved - base - predicted).abs().max()))
    return worst


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("zero_bos", [False, True])
def test_every_edge_is_the_exact_effect_of_doubling_its_source(tiny, skip, zero_bos):
    transcoders = make_random_transcoders(tiny, skip=skip)
    graph = attribute_prompt(tiny, transcoders, TOKENS, batch_size=5, zero_bos=zero_bos, bos_token_id=1,
                             desired_logit_prob=0.5)
    state = setup_prompt(tiny, transcoders, TOKENS, zero_bos=zero_bos, bos_token_id=1)
    layout = graph.layout
    assert state.bos_zeroed is zero_bos
    assert layout.n_features == int((state.activations != 0).sum()) > 20  # a real mix of active features
    assert layout.n_logits >= 2
    # the edges are not trivially zero: features feed later features, logits and tokens feed all
    assert graph.adjacency[: layout.n_features, : layout.n_features].abs().sum() > 0
    assert graph.adjacency[layout.logits].abs().min() >= 0 and graph.adjacency[layout.logits].abs().sum() > 0
    check_doubling(tiny, transcoders, graph, state, range(layout.logits.start), atol=1e-9)


def test_the_frozen_replacement_reproduces_the_models_logits(tiny):
    transcoders = make_random_transcoders(tiny, skip=True)
    state = setup_prompt(tiny, transcoders, TOKENS)
    out = frozen_forward(tiny, transcoders, state)
    torch.testing.assert_close(out.logits, tiny(TOKENS[None])[0], atol=1e-10, rtol=0)
    # errors are what the transcoders miss: reconstruction + error = the real MLP output
    for layer, tc in transcoders.transcoders.items():
        torch.testing.assert_close(tc.decode(state.activations[layer], state.inputs[layer]) + state.errors[layer],
                                   state.mlp_out[layer], atol=1e-12, rtol=0)


def test_freezing_matters_edges_differ_from_the_unfrozen_gradient(tiny):
    """The edge token → logit is not the plain gradient of the real model (which would pass through
    attention patterns, norms and MLPs): the freezes are really applied."""
    transcoders = make_random_transcoders(tiny)
    graph = attribute_prompt(tiny, transcoders, TOKENS, desired_logit_prob=0.5)
    embed = tiny.embed(TOKENS[None]).detach().requires_grad_(True)
    logits = tiny(embed, start_at_layer=0)[0, -1]
    target = graph.logit_tokens[0]
    (logits[target] - logits.mean()).backward()
    plain = (embed.grad[0] * graph_token_vectors(tiny)).sum(-1)
    frozen = graph.adjacency[graph.layout.logits.start, graph.layout.tokens]
    assert (plain - frozen).abs().max() > 1e-3


def graph_token_vectors(model):
    return model.embed(TOKENS[None])[0].detach()


def test_batch_size_does_not_change_the_graph(tiny):
    transcoders = make_random_transcoders(tiny)
    one = attribute_prompt(tiny, transcoders, TOKENS, batch_size=1)
    many = attribute_prompt(tiny, transcoders, TOKENS, batch_size=64)
    torch.testing.assert_close(one.adjacency, many.adjacency, atol=1e-12, rtol=0)


def test_a_feature_budget_keeps_rows_of_the_full_graph(tiny):
    transcoders = make_random_transcoders(tiny)
    full = attribute_prompt(tiny, transcoders, TOKENS, batch_size=4)
    part = attribute_prompt(tiny, transcoders, TOKENS, batch_size=4, max_feature_nodes=12, update_interval=1)
    assert part.layout.n_features == 12 < full.layout.n_features
    non_feature = torch.arange(full.layout.n_features, full.layout.n_nodes)
    columns = torch.cat([part.selected_features, non_feature])
    torch.testing.assert_close(part.adjacency[:12], full.adjacency[part.selected_features][:, columns])
    torch.testing.assert_close(part.adjacency[part.layout.logits], full.adjacency[full.layout.logits][:, columns])
    # the first batch chosen are the features with the largest direct influence on the logits
    direct = (full.adjacency[full.layout.logits, : full.layout.n_features].abs()
              / full.adjacency[full.layout.logits].abs().sum(1, keepdim=True))
    direct = (full.logit_probabilities[:, None] * direct).sum(0)
    top4 = set(direct.argsort(descending=True)[:4].tolist())
    assert top4 <= set(part.selected_features.tolist())


def test_salient_logits_take_the_smallest_set_reaching_the_probability():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    W_U = torch.eye(4)
    ids, probs, vecs = salient_logits(logits, W_U, desired_logit_prob=0.9)
    assert ids.tolist() == [0, 1, 2]
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.3, 0.15]))
    torch.testing.assert_close(vecs[0], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    assert salient_logits(logits, W_U, desired_logit_prob=0.99, max_n_logits=2)[0].tolist() == [0, 1]
    with pytest.raises(ConfigError, match="max_n_logits"):
        salient_logits(logits, W_U, max_n_logits=0)


def test_bad_transcoder_sets_get_one_clear_error(tiny):
    full = make_random_transcoders(tiny)
    missing = TranscoderSet({k: v for k, v in full.transcoders.items() if k != 1})
    with pytest.raises(ConfigError, match=r"no transcoder for layer\(s\) \[1\]"):
        attribute_prompt(tiny, missing, TOKENS)
    narrow = make_tiny_llama(n_layers=3, d_model=16, n_heads=4)
    with pytest.raises(ConfigError, match="d_model 16"):
        attribute_prompt(narrow, full, TOKENS)
    with pytest.raises(ConfigError, match="graph.max_tokens"):
        attribute_prompt(tiny, full, TOKENS, max_tokens=4)
    bad_hook = TranscoderSet(full.transcoders, in_hook="blocks.{layer}.hook_nope")
    with pytest.raises(ConfigError, match="hook_nope"):
        attribute_prompt(tiny, bad_hook, TOKENS)


@pytest.mark.slow
def test_smollm2_replacement_reproduces_logits_and_edges_match_doubling(smollm2):
    model = smollm2.model
    tokens = smollm2.to_tokens("When Mary and John went to the store, John gave a drink to")[0]
    transcoders = make_random_transcoders(model, d_sae=64, scale=0.05)
    state = setup_prompt(model, transcoders, tokens)
    out = frozen_forward(model, transcoders, state)
    assert (out.logits - model(tokens[None])[0]).abs().max() <= 1e-4
    graph = attribute_prompt(model, transcoders, tokens, max_feature_nodes=24, batch_size=16)
    layout = graph.layout
    assert layout.n_features == 24 and 1 <= layout.n_logits <= 10
    sample = [0, 5, 23, layout.errors.start + 3 * graph.n_pos + 4, layout.errors.stop - 1, layout.tokens.start + 2,
              layout.tokens.stop - 1]
    check_doubling(model, transcoders, graph, state, sample, atol=1e-4)
