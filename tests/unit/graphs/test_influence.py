"""Graph-level algebra of attribution graphs against exact references: circuit-tracer's own 12-node
example (tests/test_graph.py of safety-research/circuit-tracer, ported), the explicit inverse
(I - Â)⁻¹ - I, and hand-computed scores."""

from __future__ import annotations

import pytest
import torch

from mechflow.errors import ConfigError, DataError
from mechflow.graphs import GraphLayout, graph_scores, influence, logit_weights, normalize_matrix, prune_graph
from mechflow.graphs.influence import edge_influence

# circuit-tracer's example: 5 features, 2 layers x 2 tokens of error nodes, 2 tokens, 1 logit
LAYOUT = GraphLayout(n_features=5, n_errors=4, n_tokens=2, n_logits=1)


def circuit_tracer_example() -> torch.Tensor:
    edges = torch.zeros(12, 12)
    edges[11, [1, 3, 6, 8]] = 1
    edges[3, [0, 1, 6]] = 1
    edges[1, [9, 10]] = 1
    edges[0, 9] = 1
    return edges * 10


def test_node_and_edge_influence_equal_circuit_tracers_example():
    A = circuit_tracer_example()
    w = logit_weights(LAYOUT, torch.tensor([1.0]))
    expected = torch.tensor([1 / 12, 1 / 3, 0, 1 / 4, 0, 0, 1 / 3, 0, 1 / 4, 1 / 4, 1 / 6, 0], dtype=torch.float64)
    torch.testing.assert_close(influence(normalize_matrix(A.double()), w), expected)

    pruned = A.clone()
    pruned[0, 9] = 0  # node 0 falls below the 0.8 node threshold
    pruned[3, 0] = 0
    expected_edges = torch.zeros(12, 12, dtype=torch.float64)
    expected_edges[11, [1, 3, 6, 8]] = 1 / 4
    expected_edges[3, [1, 6]] = 1 / 8
    expected_edges[1, [9, 10]] = 3 / 16
    torch.testing.assert_close(edge_influence(pruned.double(), w), expected_edges)


def test_pruning_the_example_keeps_what_carries_80_percent():
    res = prune_graph(circuit_tracer_example(), LAYOUT, torch.tensor([1.0]))
    assert res.node_mask.nonzero().flatten().tolist() == [1, 3, 6, 8, 9, 10, 11]  # node 0 (1/12) dropped
    kept = {tuple(e) for e in res.edge_mask.nonzero().tolist()}
    assert kept == {(11, 1), (11, 3), (11, 6), (11, 8), (3, 1), (3, 6), (1, 9), (1, 10)}
    assert res.cumulative_scores.argmin() in (1, 6)  # the most influential nodes come first


def test_influence_is_the_series_of_the_explicit_inverse():
    torch.manual_seed(0)
    n = 30
    A = torch.randn(n, n, dtype=torch.float64).tril(-1)  # acyclic: edges from lower to higher index
    A[torch.rand(n, n) < 0.5] = 0
    normalized = normalize_matrix(A.T.contiguous())  # rows are targets
    w = torch.rand(n, dtype=torch.float64)
    exact = w @ (torch.linalg.inv(torch.eye(n, dtype=torch.float64) - normalized) - torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(influence(normalized, w), exact)


def test_a_cycle_is_refused():
    cycle = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(DataError, match="cycle"):
        influence(cycle, torch.tensor([1.0, 0.0]))


def test_scores_by_hand():
    # nodes [feature, error, token, logit]: logit <- feature and error (equal weight), feature <- token
    layout = GraphLayout(n_features=1, n_errors=1, n_tokens=1, n_logits=1)
    A = torch.zeros(4, 4)
    A[3, 0] = A[3, 1] = 2.0
    A[0, 2] = -1.0
    replacement, completeness = graph_scores(A, layout, torch.tensor([1.0]))
    # influence: feature 1/2, error 1/2, token 1/2 -> replacement 1/2;
    # non-error input share: 1, 1, 1, 1/2 weighted by 1/2, 1/2, 1/2, 1 -> 2 / 2.5
    assert replacement == pytest.approx(0.5) and completeness == pytest.approx(0.8)

    A[3, 1] = 0.0  # no error path: every path from the input runs through the feature
    assert graph_scores(A, layout, torch.tensor([1.0])) == pytest.approx((1.0, 1.0))


def test_bad_input_names_what_is_wrong():
    with pytest.raises(ConfigError, match="node_threshold"):
        prune_graph(circuit_tracer_example(), LAYOUT, torch.tensor([1.0]), node_threshold=1.5)
    with pytest.raises(DataError, match="does not fit the layout"):
        graph_scores(torch.zeros(5, 5), LAYOUT, torch.tensor([1.0]))
