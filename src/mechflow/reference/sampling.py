"""Layer-stratified random sample of the full edge graph.

Strata: the receiver layer of each edge (heads' q/k/v and the MLP of layer L are layer L; the
logits are layer ``n_layers``). Allocation is proportional to stratum size (largest remainder),
after giving every stratum ``min(min_per_layer, size)`` edges, so the sample is close to
self-weighting (an AUC on it estimates the full-graph AUC) while every layer is covered. Within a
stratum, edges are drawn without replacement by ``numpy.random.default_rng(seed)``, strata in
layer order, so one seed gives one sample.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mechflow.circuits.graph import EdgeGraph
from mechflow.errors import ConfigError


def receiver_layers(graph: EdgeGraph) -> Tensor:
    """``[n_receivers]`` layer of each receiver (logits: ``n_layers``)."""
    per_layer = 3 * graph.n_heads + 1
    out = torch.arange(graph.n_receivers) // per_layer
    out[graph.logits_receiver] = graph.n_layers
    return out


def allocate(sizes: list[int], n: int, min_per_layer: int) -> list[int]:
    """Edges drawn per stratum: floor ``min(min_per_layer, size)``, the rest proportional to the
    remaining capacity with largest-remainder rounding; all edges when ``n >= sum(sizes)``."""
    total = sum(sizes)
    if n >= total:
        return list(sizes)
    base = [min(min_per_layer, s) for s in sizes]
    rest = n - sum(base)
    if rest < 0:
        raise ConfigError(f"reference.n_sampled_edges: {n} is fewer than min_per_layer x strata = "
                          f"{sum(base)}; raise n_sampled_edges or lower reference.min_per_layer")
    cap = [s - b for s, b in zip(sizes, base)]
    quota = [rest * c / sum(cap) for c in cap]
    take = [int(q) for q in quota]
    for i in sorted(range(len(sizes)), key=lambda i: (-(quota[i] - take[i]), i))[:rest - sum(take)]:
        take[i] += 1
    return [b + min(t, c) for b, t, c in zip(base, take, cap)]


def stratified_sample(graph: EdgeGraph, n: int, min_per_layer: int, seed: int) -> tuple[Tensor, list[dict]]:
    """Sample ``n`` edges of the full graph, stratified by receiver layer.

    Returns:
        bool ``[n_senders, n_receivers]`` mask of the sample, and one row per stratum
        (``layer``, ``n_edges``, ``n_sampled``, ``weight`` = n_edges / n_sampled).
    """
    layer_of = receiver_layers(graph)
    rng = np.random.default_rng(seed)
    mask = torch.zeros_like(graph.valid)
    strata = []
    edges = [(graph.valid & (layer_of == L)[None, :]).nonzero() for L in range(graph.n_layers + 1)]
    counts = allocate([len(e) for e in edges], n, min_per_layer)
    for L, (idx, k) in enumerate(zip(edges, counts)):
        pick = idx[torch.from_numpy(np.sort(rng.choice(len(idx), size=k, replace=False)))]
        mask[pick[:, 0], pick[:, 1]] = True
        strata.append({"layer": L, "n_edges": len(idx), "n_sampled": k,
                       "weight": len(idx) / k if k else None})
    return mask, strata
