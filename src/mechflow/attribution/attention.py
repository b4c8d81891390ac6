"""Attention patterns, attention rollout and attention flow.

Steps (Abnar & Zuidema 2020, "Quantifying attention flow in transformers"):

1. Patterns: ``blocks.L.attn.hook_pattern`` of every layer, ``[n, L, H, query, key]`` (rows sum
   to 1; on GQA models each query head has its own pattern).
2. Residual-aware attention per layer: heads averaged, ``Â_l = row_normalise(0.5 A_l + 0.5 I)``;
   the identity stands for the residual connection (``residual_weight`` = 0.5 in the paper).
3. Rollout: ``R_0 = Â_0``, ``R_l = Â_l R_{l-1}``; ``R_l[i, j]`` is how much position ``i`` after
   layer ``l`` mixes input token ``j``. Rows of every ``R_l`` sum to 1.
4. Flow: the layered DAG with nodes (layer boundary ``l`` = 0..L, position) and an edge
   ``(l, j) -> (l+1, i)`` of capacity ``Â_l[i, j]``; the flow of input token ``j`` into output
   position ``i`` is the maximum flow from ``(0, j)`` to ``(L, i)`` (networkx, a torch
   dependency; preflow-push). It costs ``pos^2`` max-flow problems per prompt: meant for short
   prompts (tens of tokens).

Patterns are exact on SmolLM2 and Gemma-3 (Gemma's sliding-window layers are just patterns with
more zeros); rollout and flow assume every layer mixes only through attention + residual, which
ignores MLPs and (Gemma) post-norms, as in the paper.
"""

from __future__ import annotations

import logging

import networkx as nx
import torch
from torch import Tensor

from mechflow.errors import ConfigError

log = logging.getLogger(__name__)


@torch.no_grad()
def attention_patterns(model, tokens: Tensor, layers: list[int] | None = None, fwd_hooks=()) -> Tensor:
    """``[n, len(layers), H, pos, pos]`` attention patterns of ``tokens``.

    Args:
        layers: layers to return (default all).
        fwd_hooks: extra ``(hook_name, fn)`` pairs run before the patterns are read (a hook on
            ``hook_pattern`` that overrides the pattern is seen by the reader).
    """
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    bad = [l for l in layers if not 0 <= l < model.cfg.n_layers]
    if bad:
        raise ConfigError(f"layers: {bad} out of range for a {model.cfg.n_layers}-layer model")
    store: dict[int, Tensor] = {}

    def keep(layer: int):
        def hook(act: Tensor, hook=None) -> None:
            store[layer] = act.detach().clone()
        return hook

    hooks = list(fwd_hooks) + [(f"blocks.{l}.attn.hook_pattern", keep(l)) for l in layers]
    model.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=max(layers) + 1 if layers else 0)
    return torch.stack([store[l] for l in layers], dim=1)


def residual_attention(patterns: Tensor, residual_weight: float = 0.5) -> Tensor:
    """``[..., L, H, q, k]`` -> heads averaged, ``(1-w) A + w I``, rows normalised ``[..., L, q, k]``."""
    if patterns.shape[-1] != patterns.shape[-2]:
        raise ConfigError(f"patterns: last two axes must be query x key of equal length, got {tuple(patterns.shape)}")
    if not 0 <= residual_weight <= 1:
        raise ConfigError(f"residual_weight: {residual_weight} must be in [0, 1]")
    a = patterns.mean(-3)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    a = (1 - residual_weight) * a + residual_weight * eye
    return a / a.sum(-1, keepdim=True)


def attention_rollout(patterns: Tensor, residual_weight: float = 0.5) -> Tensor:
    """Cumulative rollout after each layer, ``[..., L, q, k]`` (``[..., -1, :, :]`` is the final).

    Args:
        patterns: ``[..., L, H, q, k]`` (e.g. from `attention_patterns`).
    """
    a = residual_attention(patterns, residual_weight)
    out = [a[..., 0, :, :]]
    for l in range(1, a.shape[-3]):
        out.append(a[..., l, :, :] @ out[-1])
    return torch.stack(out, dim=-3)


def flow_graph(layer_attn: Tensor) -> nx.DiGraph:
    """Layered DAG of one prompt: ``layer_attn [L, q, k]`` -> nodes ``(l, pos)``, capacities."""
    L, T, _ = layer_attn.shape
    g = nx.DiGraph()
    a = layer_attn.detach().double().cpu()
    for l in range(L):
        for i in range(T):
            for j in range(T):
                cap = float(a[l, i, j])
                if cap > 0:
                    g.add_edge((l, j), (l + 1, i), capacity=cap)
    return g


def max_flow_value(graph: nx.DiGraph, source, sink) -> float:
    """Maximum flow value between two nodes (0 if either is isolated)."""
    if source not in graph or sink not in graph:
        return 0.0
    return float(nx.maximum_flow_value(graph, source, sink, capacity="capacity"))


def attention_flow(patterns: Tensor, residual_weight: float = 0.5, query_positions: list[int] | None = None
                   ) -> Tensor:
    """Max-flow attribution of each input token to output positions after the last layer.

    Args:
        patterns: ``[n, L, H, q, k]`` or ``[L, H, q, k]``.
        query_positions: output positions to compute (default all; each costs ``pos`` max-flows).

    Returns:
        ``[n, len(query_positions), k]`` (``[len(query_positions), k]`` for unbatched input).
    """
    single = patterns.dim() == 4
    if single:
        patterns = patterns.unsqueeze(0)
    a = residual_attention(patterns, residual_weight)  # [n, L, T, T]
    n, L, T, _ = a.shape
    qs = list(range(T)) if query_positions is None else [q if q >= 0 else T + q for q in query_positions]
    if any(not 0 <= q < T for q in qs):
        raise ConfigError(f"query_positions: {query_positions} outside a {T}-token prompt")
    out = torch.zeros(n, len(qs), T, dtype=torch.float64)
    for b in range(n):
        g = flow_graph(a[b])
        for qi, q in enumerate(qs):
            for k in range(T):
                out[b, qi, k] = max_flow_value(g, (0, k), (L, q))
    out = out.to(patterns.dtype)
    return out[0] if single else out
