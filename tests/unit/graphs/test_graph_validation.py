"""Validation by intervention: in the frozen replacement model the graph's direct edge predicts a
feature intervention exactly; the path-sum prediction equals an explicit inverse; the real model
is measured with the rest of the model free."""

from __future__ import annotations

import pytest
import torch

from mechflow.errors import ConfigError
from mechflow.graphs.attribution import attribute_prompt, salient_logits
from mechflow.graphs.replacement import setup_prompt
from mechflow.graphs.validation import agreement, graph_prediction, top_features_for, validate_graph


@pytest.fixture(scope="module")
def setup(tiny_graph):
    state = setup_prompt(tiny_graph.model, tiny_graph.transcoders, tiny_graph.tokens)
    return tiny_graph.model, tiny_graph.transcoders, tiny_graph.graph, state


def test_frozen_interventions_equal_the_direct_edge_and_real_ones_are_measured(setup):
    model, transcoders, graph, state = setup
    answer, foil = graph.logit_tokens[:2].tolist()
    rows, summary = validate_graph(model, transcoders, graph, state, answer=answer, foil=foil, n_features=6)
    assert summary["n_interventions"] == len(rows) == 6 * 5  # zero, x2, x-1, x1.1, x0.9
    assert summary["frozen_max_abs_error"] < 1e-9
    assert summary["frozen_vs_direct"]["pearson"] == pytest.approx(1.0)
    assert summary["foil_in_graph"] and "real_diff_vs_graph" in summary
    # zero / x2 / x-1 of one feature: the frozen change is linear in the activation change
    by_node = {}
    for r in rows:
        by_node.setdefault(r["node"], {})[r["operation"]] = r
    for ops in by_node.values():
        assert ops["x2"]["frozen"] == pytest.approx(-ops["zero"]["frozen"], abs=1e-9)
        assert ops["x-1"]["frozen"] == pytest.approx(2 * ops["zero"]["frozen"], abs=1e-9)
        assert ops["x1.1"]["frozen"] == pytest.approx(-0.1 * ops["zero"]["frozen"], abs=1e-9)
        assert ops["x0.9"]["frozen"] == pytest.approx(0.1 * ops["zero"]["frozen"], abs=1e-9)
    assert set(summary["by_operation"]) == {"zero", "x2", "x-1", "x1.1", "x0.9"}
    # the real model is not the frozen one: it responds non-linearly somewhere
    assert any(abs(r["real"] - r["frozen"]) > 1e-6 for r in rows)


def test_the_second_set_leaves_out_the_excluded_positions(setup):
    model, transcoders, graph, state = setup
    answer = int(graph.logit_tokens[0])
    rows, summary = validate_graph(model, transcoders, graph, state, answer=answer, n_features=4,
                                   operations=["zero"])
    top_positions = {r["position"] for r in rows}
    excluded = sorted(top_positions)[:1]
    rows, summary = validate_graph(model, transcoders, graph, state, answer=answer, n_features=4,
                                   operations=["zero"], exclude_positions=excluded)
    top = [r for r in rows if r["selection"] == "top"]
    away = [r for r in rows if r["selection"] == "excluding_positions"]
    assert {r["position"] for r in top} == top_positions and len(top) == 4
    assert away and not {r["position"] for r in away} & set(excluded)
    # the second set is the top of the remaining features, in influence order
    ranking = top_features_for(graph, 0, graph.layout.n_features).tolist()
    position = graph.active_features[graph.selected_features, 1]
    assert [r["node"] for r in away] == [n for n in ranking if int(position[n]) not in excluded][:4]
    assert summary["excluding_positions"]["positions"] == excluded
    assert summary["excluding_positions"]["n_interventions"] == len(away)
    assert summary["n_interventions"] == len(rows) and summary["frozen_max_abs_error"] < 1e-9


def test_graph_prediction_is_the_path_sum_of_the_explicit_inverse(setup):
    _, _, graph, _ = setup
    layout = graph.layout
    m = layout.n_features
    acts = graph.activation_values[graph.selected_features].double()
    M = graph.adjacency[:m, :m].double() / acts[None, :]
    total = torch.linalg.inv(torch.eye(m, dtype=torch.float64) - M)
    logit_row = graph.adjacency[layout.logits.start, :m].double() / acts
    for source in (0, m // 2, m - 1):
        assert graph_prediction(graph, source, 0) == pytest.approx(float(logit_row @ total[:, source]), rel=1e-9,
                                                                   abs=1e-12)


def test_answers_outside_the_logit_nodes_get_one_clear_error(setup):
    model, transcoders, graph, state = setup
    missing = next(t for t in range(model.cfg.d_vocab) if t not in graph.logit_tokens.tolist())
    with pytest.raises(ConfigError, match="include_answer_logits"):
        validate_graph(model, transcoders, graph, state, answer=missing)
    forced = attribute_prompt(model, transcoders, state.tokens, desired_logit_prob=0.5, include_logits=[missing])
    assert forced.logit_tokens[-1] == missing


def test_included_logits_come_after_the_salient_set():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.07, 0.03]))
    ids, probs, _ = salient_logits(logits, torch.eye(4), desired_logit_prob=0.5, include=[3, 0])
    assert ids.tolist() == [0, 3]
    torch.testing.assert_close(probs, torch.tensor([0.6, 0.03]))


def test_agreement_counts_signs_and_handles_constant_input():
    res = agreement([1.0, -2.0, 3.0, 0.0], [2.0, -1.0, -1.0, 5.0])
    assert res["sign_agreement"] == pytest.approx(2 / 3) and res["n"] == 4
    assert agreement([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])["pearson"] is None
