"""Edge attribution patching (EAP) and EAP-IG edge scores on the MIB edge graph.

Steps (Syed, Rager & Conmy 2023 "Attribution patching outperforms automated circuit discovery";
Hanna, Pezzelle & Belinkov 2024 "Have faith in faithfulness", EAP-IG "inputs" variant):

1. One forward on the corrupted and one on the clean prompts record every sender's output;
   ``diff[s] = act_s(corrupted) - act_s(clean)``, stored ``[n_senders, b*pos*d]``.
2. One forward (EAP) or ``steps`` forwards (EAP-IG) on the clean tokens whose EMBEDDING is
   ``emb(t) = emb_clean + t (emb_corrupted - emb_clean)``; every receiver reads its own input
   tensor, so the backward gives ``dm/d input_r`` separately for each q/k/v/MLP/logits receiver.
   The gradient flows through all later layers (no detach).
3. score(s -> r) = mean over t of ``diff[s] . dm/d input_r(t)`` summed over prompts' positions and
   d_model, divided by the number of prompts (m = mean per-prompt metric). A gradient hook on each
   layer's receiver tensor contracts ``diff[:n_prev] @ grad^T`` as soon as the gradient exists, so
   the full receiver-gradient matrix is never held and no Python loop runs over edges.

Interpolation points (t = 0 clean, 1 corrupted): ``rule="left"`` takes t = k/steps,
k = 0..steps-1, the points of the reference EAP-IG code (hannamw/EAP-IG ``get_scores_eap_ig``:
corrupted + (k/steps)(clean - corrupted), k = 1..steps); ``steps=1`` is then exactly EAP.
``"midpoint"`` is available for a more accurate path integral.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechflow.attribution.gradients import ig_points
from mechflow.attribution.patching import PairBatch, check_batch
from mechflow.circuits.config import checked
from mechflow.circuits.forward import graph_forward
from mechflow.circuits.graph import EdgeGraph

log = logging.getLogger(__name__)


def interpolation_points(method: str, steps: int, rule: str) -> Tensor:
    """The points t of the scores' path integral: ``[0]`` for EAP, ``ig_points(steps, rule)`` for
    EAP-IG; anything else fails `CircuitConfig`'s own check of ``circuits.method``."""
    method = checked("method", method)
    return torch.zeros(1, dtype=torch.float64) if method == "eap" else ig_points(steps, rule)


def edge_scores(
    model,
    batch: PairBatch,
    method: str = "eap-ig",
    steps: int = 5,
    rule: str = "left",
    graph: EdgeGraph | None = None,
    progress: bool = False,
    from_layer: int = 0,
) -> Tensor:
    """Score every edge of the graph; ``[n_senders, n_receivers]``, zero where no edge exists.

    Args:
        method: ``"eap"`` (gradient at the clean input) or ``"eap-ig"`` (``steps`` points).
        steps, rule: EAP-IG interpolation (see module docstring); ignored for ``"eap"``.
        from_layer: score only edges into receivers of layers ``>= from_layer`` (and the logits);
            the others are 0. Each step's forward still starts at the (interpolated) embedding,
            but layers below ``from_layer`` run without autograd and the backward stops there, so
            the scores it does compute are those of ``from_layer=0`` (up to float round-off) at a
            fraction of the backward cost. For restricted graphs (the ACDC benchmark).

    All prompts share each forward (the batch metric is defined on the whole batch); split large
    prompt sets upstream and average the scores weighted by batch size.
    """
    check_batch(batch)
    ts = interpolation_points(method, steps, rule)
    graph = graph or EdgeGraph.from_cfg(model.cfg)
    n = batch.clean_tokens.shape[0]
    dtype = model.cfg.dtype
    clean, corrupt = batch.clean_tokens, batch.corrupted_tokens
    with torch.no_grad():
        _, diff = graph_forward(model, corrupt, graph, record=True)
        _, clean_acts = graph_forward(model, clean, graph, record=True)
        diff -= clean_acts
        emb_clean = clean_acts[0].clone()
        del clean_acts
    flat = diff.reshape(graph.n_senders, -1)
    acc = torch.zeros(graph.n_senders, graph.n_receivers, dtype=dtype)
    for t in tqdm(ts.tolist(), desc=f"{method} steps", disable=not progress):
        emb = (emb_clean + t * diff[0]).requires_grad_(from_layer == 0)
        leaves = [emb] if from_layer == 0 else []
        hooks = _contracting_hooks(graph, flat, acc, leaves)
        with torch.enable_grad():
            logits, _ = graph_forward(model, clean, graph, input_embed=emb, on_receiver=hooks,
                                      grad_from_layer=from_layer)
            m = batch.metric(logits).sum()
            torch.autograd.grad(m, leaves)
    return acc.double() / len(ts) / n * graph.valid


def _contracting_hooks(graph: EdgeGraph, flat: Tensor, acc: Tensor, leaves: list[Tensor]):
    """Receiver callback registering a gradient hook that adds ``diff . grad`` into ``acc``; the
    residual leaf of ``graph_forward(grad_from_layer=...)`` is appended to ``leaves``."""
    H = graph.n_heads

    def on_receiver(layer: int, kind: str, tensor: Tensor) -> None:
        if kind == "residual":
            leaves.append(tensor)
            return
        if kind == "qkv":
            n_prev, cols = graph.first_sender(layer), slice(graph.first_receiver(layer),
                                                           graph.first_receiver(layer) + 3 * H)
        elif kind == "mlp":
            n_prev, cols = graph.first_sender(layer) + H, slice(graph.mlp_receiver(layer),
                                                               graph.mlp_receiver(layer) + 1)
        else:
            n_prev, cols = graph.n_senders, slice(graph.logits_receiver, graph.logits_receiver + 1)

        def hook(grad: Tensor) -> None:
            g = grad.unsqueeze(2) if grad.ndim == 3 else grad  # [b, pos, R, d]
            g = g.permute(2, 0, 1, 3).reshape(g.shape[2], -1)  # [R, b*pos*d], same order as flat
            acc[:n_prev, cols] += flat[:n_prev] @ g.T

        tensor.register_hook(hook)

    return on_receiver
