"""A restricted edge graph: one edge subset that every method (ACDC, EAP, EAP-IG, exact) uses.

The restriction is a FILTER over `mechflow.circuits.graph.EdgeGraph`'s edges, a bool
``[n_senders, n_receivers]`` mask ``R`` (a subset of ``graph.valid``), never a different graph:
node names, edge names and the edge-removal semantics stay those of the circuits package.

Meaning, identical for every method: only edges in ``R`` are candidates; every edge outside ``R``
is always present (its receiver reads the sender's current output, as in the full model).

* ACDC: visits only the edges in ``R``; the rest are never removed.
* EAP / EAP-IG: rank only the edges in ``R`` (`restrict_scores` sets the others to NaN, and
  `ranked` drops them).
* Exact evaluation: a circuit ``C`` (subset of ``R``) is evaluated with ``kept = C | ~R``
  (`full_kept`), i.e. removed edges ``= R & ~C``; the "empty" restricted circuit removes all of
  ``R``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mechflow.benchmark.config import RestrictionConfig
from mechflow.circuits.graph import EdgeGraph
from mechflow.errors import ConfigError


@dataclass(frozen=True)
class EdgeRestriction:
    """The edge subset selected by a `RestrictionConfig` on one graph."""

    graph: EdgeGraph
    mask: Tensor  # bool [n_senders, n_receivers], subset of graph.valid
    spec: RestrictionConfig

    @classmethod
    def build(cls, graph: EdgeGraph, spec: RestrictionConfig | dict | None = None) -> EdgeRestriction:
        spec = spec if isinstance(spec, RestrictionConfig) else RestrictionConfig.from_dict(spec)
        mask = graph.valid.clone()
        if spec.last_layers is not None:
            if spec.last_layers > graph.n_layers:
                raise ConfigError(f"benchmark.restriction.last_layers: {spec.last_layers} exceeds the "
                                  f"model's {graph.n_layers} layers; use null for every layer")
            first = graph.first_receiver(graph.n_layers - spec.last_layers)
            mask[:, :first] = False
        if spec.sender_last_layers is not None:
            if spec.sender_last_layers > graph.n_layers:
                raise ConfigError(f"benchmark.restriction.sender_last_layers: {spec.sender_last_layers} exceeds "
                                  f"the model's {graph.n_layers} layers; use null for every sender")
            mask[:graph.first_sender(graph.n_layers - spec.sender_last_layers), :] = False
        if spec.components == "heads":
            for L in range(graph.n_layers):
                mask[graph.mlp_sender(L), :] = False
                mask[:, graph.mlp_receiver(L)] = False
        if not mask.any():
            raise ConfigError(f"benchmark.restriction: {spec} leaves no edge; widen it")
        return cls(graph, mask, spec)

    @property
    def n_edges(self) -> int:
        return int(self.mask.sum())

    @property
    def first_receiver_layer(self) -> int:
        """Lowest layer with a restricted receiver (the logits count as the last layer): gradient
        methods need no backward below it (`mechflow.circuits.eap.edge_scores` ``from_layer``)."""
        first_col = int(self.mask.any(0).nonzero()[0])
        return min(first_col // (3 * self.graph.n_heads + 1), self.graph.n_layers - 1)

    def full_kept(self, circuit: Tensor) -> Tensor:
        """``kept`` mask for exact evaluation: the circuit's edges plus every unrestricted edge."""
        return (circuit.bool() & self.mask) | (self.graph.valid & ~self.mask)

    def removed(self, circuit: Tensor) -> Tensor:
        """Edges patched when evaluating ``circuit``: restricted edges not in it."""
        return self.mask & ~circuit.bool()

    def restrict_scores(self, scores: Tensor) -> Tensor:
        """Edge scores with NaN outside the restriction (so they cannot be mistaken for 0 scores)."""
        out = scores.clone().double()
        out[~self.mask] = float("nan")
        return out

    def ranked(self, scores: Tensor, absolute: bool = True) -> Tensor:
        """Flat indices of the restricted edges, best first (stable on ties), as
        `mechflow.circuits.faithfulness.ranked_edges` orders the full graph."""
        flat = self.mask.flatten().nonzero().flatten()
        vals = scores.flatten()[flat].double()
        vals = vals.abs() if absolute else vals
        return flat[torch.sort(-vals, stable=True).indices]

    def edge_names(self) -> list[str]:
        return self.graph.edge_names(self.mask)
