"""Node-level circuits: the input embedding, every attention head and every MLP as circuit units.

Why nodes: on models that normalise the attention / MLP output before it joins the residual
stream (Gemma-2/3 post-norms) a single head's output is not an additive term of any receiver's
input, so edge removal is not defined the MIB way (`mechflow.circuits.forward.check_edge_model`).
Patching a node's own activation is exact on every model.

Steps (node patching as in Wang et al. 2022 and the MIB node-circuit track, Mueller et al. 2025;
scores as EAP-IG, Hanna, Pezzelle & Belinkov 2024, applied to node activations):

1. Nodes are the edge graph's senders, same names and order (`EdgeGraph.sender_names`): ``input``
   = ``blocks.0.hook_resid_pre``; head ``a{L}.h{h}`` = slice h of ``blocks.L.attn.hook_z`` (before
   W_O: its bias and any post-attention norm are recomputed from the patched heads); ``m{L}`` =
   ``blocks.L.hook_mlp_out`` (after any post-MLP norm: the MLP's contribution to the residual).
2. m(C) = task metric of the clean run in which every node OUTSIDE C takes its corrupted-run
   activation while the nodes in C are recomputed from their (patched) inputs. m(N) is the clean
   run; m(empty) the corrupted run (every node patched: the whole residual stream is corrupted).
3. Node scores: score(n) = mean over interpolation points t of
   ``(a_n(corrupted) - a_n(clean)) . dm/da_n`` at the clean tokens whose embedding is moved
   ``t`` of the way to the corrupted embedding (the EAP-IG "inputs" variant; ``t = 0`` only for
   EAP), summed over prompts' positions and features, divided by the number of prompts. On
   additive models this is the sum of the node's outgoing EAP-IG edge scores (tested), so node
   and edge rankings come from the same estimator; it also runs where edges are undefined.
4. Search, curve, sufficiency / comprehensiveness and CPR / CMD reuse the edge functions of
   `mechflow.circuits.faithfulness` / `search` with the node evaluator: budgets are percentages
   of the number of nodes, all numbers exact patched forward passes.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechflow.attribution.patching import PairBatch, check_batch
from mechflow.circuits.eap import interpolation_points
from mechflow.circuits.graph import EdgeGraph
from mechflow.contracts.hooks import COMPONENT_HOOKS, INPUT_HOOK, block_hook
from mechflow.contracts.names import node_kind

__all__ = ["INPUT_HOOK", "NodeEvaluator", "cache_nodes", "node_hooks", "node_kind", "node_patch_hooks", "node_scores",
           "ranked_nodes"]

log = logging.getLogger(__name__)


def node_hooks(n_layers: int) -> list[str]:
    """The hook names holding every node's activation (input, then per layer hook_z, hook_mlp_out)."""
    return [INPUT_HOOK] + [block_hook(L, COMPONENT_HOOKS[kind]) for L in range(n_layers) for kind in ("head", "mlp")]


@torch.no_grad()
def cache_nodes(model, tokens: Tensor) -> dict[str, Tensor]:
    names = set(node_hooks(model.cfg.n_layers))
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return {n: cache[n] for n in names}


def node_patch_hooks(graph: EdgeGraph, kept: Tensor, source: dict[str, Tensor]) -> list[tuple[str, object]]:
    """Forward hooks that give every node not in ``kept`` (bool ``[n_senders]``) its ``source`` value."""
    kept = kept.bool()
    hooks: list[tuple[str, object]] = []

    def replace(value: Tensor):
        return lambda act, hook=None: value.clone()

    def heads_from(value: Tensor, heads: list[int]):
        def hook(act: Tensor, hook=None) -> Tensor:
            act = act.clone()
            act[:, :, heads] = value[:, :, heads]
            return act
        return hook

    if not bool(kept[0]):
        hooks.append((INPUT_HOOK, replace(source[INPUT_HOOK])))
    for L in range(graph.n_layers):
        heads = [h for h in range(graph.n_heads) if not bool(kept[graph.head_sender(L, h)])]
        if len(heads) == graph.n_heads:
            hooks.append((f"blocks.{L}.attn.hook_z", replace(source[f"blocks.{L}.attn.hook_z"])))
        elif heads:
            hooks.append((f"blocks.{L}.attn.hook_z", heads_from(source[f"blocks.{L}.attn.hook_z"], heads)))
        if not bool(kept[graph.mlp_sender(L)]):
            hooks.append((f"blocks.{L}.hook_mlp_out", replace(source[f"blocks.{L}.hook_mlp_out"])))
    return hooks


class NodeEvaluator:
    """Exact node-circuit evaluation; the interface of `CircuitEvaluator` with units = nodes.

    Caches the corrupted activations of every node once; each evaluation is one hooked forward.
    """

    def __init__(self, model, batch: PairBatch, graph: EdgeGraph | None = None):
        check_batch(batch)
        self.model, self.batch = model, batch
        self.graph = graph or EdgeGraph.from_cfg(model.cfg)
        self.n_evaluations = 0
        self._corrupted = cache_nodes(model, batch.corrupted_tokens)
        self.m_full = self.metric(self.universe)
        self.m_empty = self.metric(torch.zeros_like(self.universe))

    @property
    def n_units(self) -> int:
        return self.graph.n_senders

    @property
    def universe(self) -> Tensor:
        """Every node: bool ``[n_senders]``."""
        return torch.ones(self.graph.n_senders, dtype=torch.bool)

    def prefix(self, order: Tensor, k: int) -> Tensor:
        """Bool ``[n_senders]`` mask of the first ``k`` ranked nodes."""
        mask = torch.zeros(self.graph.n_senders, dtype=torch.bool)
        mask[order[:k]] = True
        return mask

    @torch.no_grad()
    def metric_per_prompt(self, kept: Tensor) -> Tensor:
        """Per-prompt metric ``[n]`` of the node circuit ``kept`` (bool ``[n_senders]``)."""
        self.n_evaluations += 1
        hooks = node_patch_hooks(self.graph, kept, self._corrupted)
        return self.batch.metric(self.model.run_with_hooks(self.batch.clean_tokens, fwd_hooks=hooks))

    def metric(self, kept: Tensor) -> float:
        return float(self.metric_per_prompt(kept).double().mean())

    def faithfulness(self, kept: Tensor) -> float:
        from mechflow.circuits.faithfulness import normalized_faithfulness

        return normalized_faithfulness(self.metric(kept), self.m_full, self.m_empty)


def node_scores(
    model,
    batch: PairBatch,
    method: str = "eap-ig",
    steps: int = 5,
    rule: str = "left",
    graph: EdgeGraph | None = None,
    progress: bool = False,
) -> Tensor:
    """EAP / EAP-IG score of every node (step 3 of the module docstring): float64 ``[n_senders]``."""
    check_batch(batch)
    ts = interpolation_points(method, steps, rule)
    graph = graph or EdgeGraph.from_cfg(model.cfg)
    clean_acts = cache_nodes(model, batch.clean_tokens)
    corr_acts = cache_nodes(model, batch.corrupted_tokens)
    names = node_hooks(graph.n_layers)
    diff = {n: corr_acts[n] - clean_acts[n] for n in names}
    del corr_acts
    acc = torch.zeros(graph.n_senders, dtype=torch.float64)
    for t in tqdm(ts.tolist(), desc=f"node {method} steps", disable=not progress):
        emb = (clean_acts[INPUT_HOOK] + t * diff[INPUT_HOOK]).requires_grad_(True)
        acts: dict[str, Tensor] = {}

        def keep(act: Tensor, hook, emb: Tensor = emb, acts: dict[str, Tensor] = acts) -> Tensor:
            if hook.name == INPUT_HOOK:
                act = emb  # the interpolated embedding, a leaf of this step's graph
            acts[hook.name] = act
            return act

        with torch.enable_grad():
            logits = model.run_with_hooks(batch.clean_tokens, fwd_hooks=[(n, keep) for n in names])
            grads = torch.autograd.grad(batch.metric(logits).sum(), [acts[n] for n in names])
        with torch.no_grad():
            for name, g in zip(names, grads):
                prod = (diff[name] * g).double()
                if name == INPUT_HOOK:
                    acc[0] += prod.sum()
                    continue
                L = int(name.split(".")[1])
                if name.endswith("hook_z"):  # [b, pos, H, d_head]
                    acc[graph.head_sender(L, 0):graph.head_sender(L, 0) + graph.n_heads] += prod.sum(dim=(0, 1, 3))
                else:
                    acc[graph.mlp_sender(L)] += prod.sum()
    return acc / len(ts) / batch.clean_tokens.shape[0]


def ranked_nodes(scores: Tensor, absolute: bool = True) -> Tensor:
    """Node indices best first (|score| by default; stable on ties)."""
    vals = scores.double().abs() if absolute else scores.double()
    return torch.sort(-vals, stable=True).indices
