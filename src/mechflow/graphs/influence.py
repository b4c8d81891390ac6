"""Influence, pruning and the replacement / completeness scores of an attribution graph.

The definitions are circuit-tracer's (Ameisen et al. 2025, "Circuit Tracing"; the open-source
`circuit_tracer/graph.py`: `normalize_matrix`, `compute_influence`, `compute_node_influence`,
`compute_edge_influence`, `find_threshold`, `prune_graph`, `compute_graph_scores`), so mechflow's
numbers mean what that tool's and Neuronpedia's mean. Written here rather than imported because
circuit-tracer cannot share mechflow's environment (it pins transformers <= 4.57.3 and
huggingface-hub < 1.0) and because these functions work on a bare adjacency matrix plus a
`GraphLayout`, not on circuit-tracer's `Graph` object with a TransformerLens config.

Conventions (as circuit-tracer's `Graph`):

- Nodes are ordered ``[features, errors, tokens, logits]``; there is one error node per (layer,
  position), layer-major, so ``n_errors = n_layers * n_tokens``.
- ``A[target, source]`` is the direct effect of ``source`` on ``target`` (rows are targets).
- Influence uses the row-normalised absolute adjacency ``Â = |A| / rowsum |A|``. The total influence
  of every node on the logits is ``w (Â + Â² + …) = w ((I − Â)⁻¹ − I)``, with ``w`` the logit nodes'
  probabilities. An attribution graph is acyclic (edges go from earlier layers/positions to later
  ones), so ``Â`` is nilpotent and the series ends after at most ``n`` terms: it is summed term by
  term, never inverting an ``n × n`` matrix (big graphs have tens of thousands of nodes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from mechflow.errors import ConfigError, DataError


@dataclass(frozen=True)
class GraphLayout:
    """How many nodes of each kind, in the order ``[features, errors, tokens, logits]``."""

    n_features: int
    n_errors: int
    n_tokens: int
    n_logits: int

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_errors + self.n_tokens + self.n_logits

    @property
    def errors(self) -> slice:
        return slice(self.n_features, self.n_features + self.n_errors)

    @property
    def tokens(self) -> slice:
        start = self.n_features + self.n_errors
        return slice(start, start + self.n_tokens)

    @property
    def logits(self) -> slice:
        return slice(self.n_nodes - self.n_logits, self.n_nodes)

    def check(self, adjacency: Tensor, probabilities: Tensor) -> None:
        if adjacency.shape != (self.n_nodes, self.n_nodes):
            raise DataError(f"adjacency matrix of shape {tuple(adjacency.shape)} does not fit the layout "
                            f"{self} ({self.n_nodes} nodes): rebuild the graph")
        if probabilities.shape != (self.n_logits,):
            raise DataError(f"{tuple(probabilities.shape)} logit probabilities for {self.n_logits} logit nodes")


def normalize_matrix(adjacency: Tensor) -> Tensor:
    """``|A|`` with every row scaled to sum to 1 (rows without inputs stay zero): each target's
    share of its direct inputs (circuit-tracer's `normalize_matrix`)."""
    normalized = adjacency.abs()
    return normalized / normalized.sum(dim=1, keepdim=True).clamp(min=1e-10)


def influence(normalized: Tensor, weights: Tensor) -> Tensor:
    """``weights @ (Â + Â² + …)``: each node's total (direct and indirect) influence on the weighted
    targets (circuit-tracer's `compute_influence`). ``normalized`` must describe an acyclic graph;
    the series then ends after at most ``n`` terms (error otherwise)."""
    current = weights @ normalized
    total = current.clone()
    for _ in range(normalized.shape[0]):
        if not current.any():
            return total
        current = current @ normalized
        total += current
    raise DataError("influence did not vanish after as many steps as the graph has nodes: the adjacency "
                    "matrix has a cycle, which an attribution graph cannot have")


def logit_weights(layout: GraphLayout, probabilities: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Per-node weights: the logit nodes' probabilities, zero elsewhere."""
    w = torch.zeros(layout.n_nodes, dtype=dtype)
    w[layout.logits] = probabilities.to(dtype)
    return w


def find_threshold(scores: Tensor, fraction: float) -> Tensor:
    """The smallest score among the highest scores that together hold ``fraction`` of the total
    (circuit-tracer's `find_threshold`: keep every score >= it)."""
    ordered = torch.sort(scores, descending=True).values
    cumulative = torch.cumsum(ordered, dim=0) / ordered.sum()
    index = min(int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype)).item()),
                len(cumulative) - 1)
    return ordered[index]


class PruneResult(NamedTuple):
    node_mask: Tensor  # nodes kept
    edge_mask: Tensor  # edges kept, [target, source]
    cumulative_scores: Tensor  # each node's place in the cumulative influence (0 = most influential)
    node_influence: Tensor  # each node's influence on the logits (unpruned graph)


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}: {value!r} must be a fraction of the total influence in [0, 1], e.g. 0.8")


def prune_graph(adjacency: Tensor, layout: GraphLayout, probabilities: Tensor, node_threshold: float = 0.8,
                edge_threshold: float = 0.98) -> PruneResult:
    """Keep the nodes that carry ``node_threshold`` of the influence on the logits and the edges that
    carry ``edge_threshold`` of it, as circuit-tracer's `prune_graph`: tokens and logits always stay;
    then feature and error nodes left without outgoing edges, and features left without incoming
    edges, are dropped until nothing changes."""
    _check_fraction("node_threshold", node_threshold)
    _check_fraction("edge_threshold", edge_threshold)
    layout.check(adjacency, probabilities)
    A = adjacency.to(torch.float64)
    w = logit_weights(layout, probabilities)
    node_influence = influence(normalize_matrix(A), w)
    node_mask = node_influence >= find_threshold(node_influence, node_threshold)
    node_mask[layout.tokens.start:] = True  # tokens and logits

    pruned = A.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    edge_scores = edge_influence(pruned, w)
    edge_mask = edge_scores >= find_threshold(edge_scores.flatten(), edge_threshold)

    inner = slice(0, layout.tokens.start)  # features and errors
    features = slice(0, layout.n_features)

    def drop_dangling() -> None:
        node_mask[inner] &= edge_mask[:, inner].any(0)  # has an outgoing edge
        node_mask[features] &= edge_mask[features].any(1)  # has an incoming edge

    before = node_mask.clone()
    drop_dangling()
    while not torch.equal(node_mask, before):  # circuit-tracer's loop, step for step
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        drop_dangling()

    ordered, order = torch.sort(node_influence, descending=True)
    cumulative = torch.zeros_like(node_influence)
    cumulative[order] = torch.cumsum(ordered, dim=0) / ordered.sum()
    return PruneResult(node_mask, edge_mask, cumulative, node_influence)


def edge_influence(adjacency: Tensor, weights: Tensor) -> Tensor:
    """Each edge's share of the influence on the weighted targets: ``Â[t, s] · (influence[t] + w[t])``
    (circuit-tracer's `compute_edge_influence`)."""
    normalized = normalize_matrix(adjacency)
    target_influence = influence(normalized, weights) + weights
    return normalized * target_influence[:, None]


def graph_scores(adjacency: Tensor, layout: GraphLayout, probabilities: Tensor) -> tuple[float, float]:
    """``(replacement, completeness)`` of a graph, circuit-tracer's `compute_graph_scores`:

    - replacement: the tokens' share of the influence on the logits that starts at tokens or error
      nodes, ``I(tokens) / (I(tokens) + I(errors))`` — 1 when every path from the input to the output
      runs through features.
    - completeness: the average, weighted by each node's influence on the output (its influence plus
      its own logit weight), of the fraction of its normalised inputs that are not error nodes.

    For a pruned graph pass the adjacency with the pruned nodes' and edges' entries set to zero.
    """
    layout.check(adjacency, probabilities)
    w = logit_weights(layout, probabilities)
    normalized = normalize_matrix(adjacency.to(torch.float64))
    node_influence = influence(normalized, w)
    token_influence = node_influence[layout.tokens].sum()
    error_influence = node_influence[layout.errors].sum()
    replacement = token_influence / (token_influence + error_influence)
    non_error = 1 - normalized[:, layout.errors].sum(dim=1)
    output_influence = node_influence + w
    completeness = (non_error * output_influence).sum() / output_influence.sum()
    return float(replacement), float(completeness)
