"""MLP neuron attribution: direct logit attribution, attribution patching, top-activating contexts.

Steps:

1. Neuron DLA (Elhage et al. 2021; Geva et al. 2022 "Transformer feed-forward layers build
   predictions by promoting concepts"): neuron ``i`` of layer ``L`` writes
   ``post_i W_out[i]`` (``post = blocks.L.mlp.hook_post``, after the gated activation). Read at
   position ``pos`` through the final norm with its clean-run scale FROZEN and projected on
   ``W_U[:, answer] - W_U[:, wrong]`` (as in `mechflow.attribution.lens`). On Gemma the MLP output
   passes ``ln2_post`` before the residual: its clean-run scale is frozen as well. The neuron
   scores of a layer plus its ``b_out`` term sum exactly to that MLP's DLA.
2. Neuron attribution patching (Nanda 2023; Syed et al. 2023): one forward on the base prompts
   with ``hook_post`` of every selected layer in the autograd graph and one backward;
   ``score_i = sum_pos (post_src - post_base)_i * dm/dpost_i`` (first-order estimate of patching
   that neuron at every position). Directions as in `mechflow.attribution.patching`.
3. Top-activating contexts from a harvest of ``blocks.L.mlp.hook_post`` (Parquet shards read
   through `mechflow.harvest.shards`, one row group at a time, keeping a running top-k per
   neuron), then the token window around each hit from the shards' ``token_id`` column.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from torch import Tensor

from mechflow.attribution.lens import (
    answer_directions,
    has_post_norms,
    norm_linear,
    pos_index,
    scores_frame,
)
from mechflow.attribution.patching import TokenPairs, base_and_source
from mechflow.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class NeuronDLA:
    """Attributes:
        layers: the layers scored.
        neurons: ``[len(layers), d_mlp, n]`` per-neuron DLA.
        bias: ``[len(layers), n]`` the ``b_out`` term.
    """

    layers: list[int]
    neurons: Tensor
    bias: Tensor

    def mlp_total(self) -> Tensor:
        """``[len(layers), n]``: equals each MLP's DLA."""
        return self.neurons.sum(1) + self.bias

    def top(self, k: int = 20, by: str = "abs") -> pl.DataFrame:
        return top_neurons(self.neurons.mean(-1), k, "neuron_dla", by, self.layers)


@torch.no_grad()
def neuron_dla(model, tokens: Tensor, answer_ids, wrong_ids=None, layers: list[int] | None = None,
               pos: int = -1) -> NeuronDLA:
    """Per-neuron direct logit attribution (module docstring, step 1)."""
    n, n_pos = tokens.shape
    p = pos_index(pos, n_pos)
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    post_norm = has_post_norms(model)
    names = {"ln_final.hook_scale"} | {f"blocks.{l}.mlp.hook_post" for l in layers}
    if post_norm:
        names |= {f"blocks.{l}.ln2_post.hook_scale" for l in layers}
    _, cache = model.run_with_cache(tokens, names_filter=lambda x: x in names)
    direction = answer_directions(model, answer_ids, wrong_ids, n)
    # The frozen norms are diagonal maps, so push the direction back through them once.
    v = norm_linear(model.ln_final, direction, cache["ln_final.hook_scale"][:, p])  # [n, d_model]
    out, bias = [], []
    for l in layers:
        mlp = model.blocks[l].mlp
        vl = norm_linear(model.blocks[l].ln2_post, v, cache[f"blocks.{l}.ln2_post.hook_scale"][:, p]) \
            if post_norm else v
        out.append((cache[f"blocks.{l}.mlp.hook_post"][:, p] * (vl @ mlp.W_out.T)).T)  # [d_mlp, n]
        bias.append(vl @ mlp.b_out)
    return NeuronDLA(layers, torch.stack(out), torch.stack(bias))


def neuron_attribution_patching(model, clean_tokens: Tensor, corrupted_tokens: Tensor,
                                metric: Callable[[Tensor], Tensor], direction: str = "noising",
                                layers: list[int] | None = None, per_prompt: bool = False) -> Tensor:
    """First-order patching estimate per neuron, ``[len(layers), d_mlp]`` (``[..., n]`` per prompt)."""
    base, source = base_and_source(TokenPairs(clean_tokens, corrupted_tokens, metric), direction)
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    names = [f"blocks.{l}.mlp.hook_post" for l in layers]
    with torch.no_grad():
        _, src_cache = model.run_with_cache(source, names_filter=lambda x: x in names)
    acts: dict[str, Tensor] = {}

    def keep(act: Tensor, hook) -> Tensor:
        if not act.requires_grad:
            act = act.detach().requires_grad_(True)
        acts[hook.name] = act
        return act

    with torch.enable_grad():
        m = metric(model.run_with_hooks(base, fwd_hooks=[(name, keep) for name in names]))
        grads = torch.autograd.grad(m.sum(), [acts[name] for name in names])
    with torch.no_grad():
        out = torch.stack([((src_cache[name] - acts[name].detach()) * g).sum(1).T
                           for name, g in zip(names, grads)])  # [layers, d_mlp, n]
    return out if per_prompt else out.mean(-1)


def top_neurons(scores: Tensor, k: int, method: str, by: str = "abs", layers: list[int] | None = None
                ) -> pl.DataFrame:
    """The ``k`` neurons of ``scores [len(layers), d_mlp]`` with the largest ``|score|`` (``abs``),
    score (``pos``) or ``-score`` (``neg``), as component/layer/head/score/method/neuron rows."""
    key = {"abs": scores.abs(), "pos": scores, "neg": -scores}.get(by)
    if key is None:
        raise ConfigError(f"neurons.by: {by!r} is not one of 'abs', 'pos', 'neg'")
    layers = list(range(scores.shape[0])) if layers is None else layers
    d = scores.shape[1]
    _, idx = key.flatten().topk(min(k, key.numel()))
    rows = [{"component": f"neuron L{layers[int(i) // d]}N{int(i) % d}", "layer": layers[int(i) // d],
             "score": float(scores.flatten()[i]), "neuron": int(i) % d} for i in idx]
    return scores_frame(rows, method)


# --------------------------------------------------------------------------------------------
# Top-activating contexts


def top_activating_contexts(harvest: str | Path, neurons: list[int], k: int = 10, window: int = 8,
                            hook: str | None = None, batch_rows: int = 8192, tokenizer=None) -> pl.DataFrame:
    """Top-``k`` activations of each of ``neurons`` over a harvest of ``blocks.L.mlp.hook_post``.

    Args:
        harvest: manifest, hook folder, harvest folder or index (`mechflow.harvest.shards`).
        neurons: neuron indices of that hook.
        window: tokens of context kept before the hit (the hit token is the last one).
        hook: which hook when ``harvest`` holds several.
        tokenizer: optional HF tokenizer; adds a decoded ``context`` column.

    Returns:
        Rows neuron, rank (0 = highest), activation, context_id, position, token_id,
        context_token_ids (``window + 1`` ids ending at the hit, fewer at a context's start).
    """
    from mechflow.harvest.shards import (
        iter_activation_batches,
        load_manifest,
        scan_activations,
    )

    if k < 1 or window < 0:
        raise ConfigError(f"top_activating_contexts: k={k} must be >= 1 and window={window} >= 0")
    manifest, _ = load_manifest(harvest, hook)
    if not neurons or min(neurons) < 0 or max(neurons) >= manifest.d:
        raise ConfigError(f"neurons: {neurons} must be non-empty indices below the hook width {manifest.d}")
    if not manifest.hook.endswith("mlp.hook_post"):
        log.warning("top_activating_contexts: %s is not an MLP hook_post harvest", manifest.hook)
    idx = torch.tensor(neurons)
    best_v = torch.full((len(neurons), 0), float("-inf"))
    best_ctx = torch.zeros(len(neurons), 0, dtype=torch.long)
    best_pos = torch.zeros(len(neurons), 0, dtype=torch.long)
    for batch in iter_activation_batches(harvest, batch_rows, ["context_id", "position", "activation"], hook=hook):
        acts = batch["activation"][:, idx].T.float()  # [neurons, rows]
        ctx = batch["context_id"].long().expand(len(neurons), -1)
        pos = batch["position"].long().expand(len(neurons), -1)
        v = torch.cat([best_v, acts], 1)
        keep = v.topk(min(k, v.shape[1]), dim=1).indices
        best_v = v.gather(1, keep)
        best_ctx = torch.cat([best_ctx, ctx], 1).gather(1, keep)
        best_pos = torch.cat([best_pos, pos], 1).gather(1, keep)
    wanted = sorted({int(c) for c in best_ctx.flatten()})
    tokens = (scan_activations(harvest, hook).select("context_id", "position", "token_id")
              .filter(pl.col("context_id").is_in(wanted)).collect())
    by_ctx = {c: dict(zip(g["position"].to_list(), g["token_id"].to_list()))
              for (c,), g in tokens.group_by("context_id")}
    rows = []
    for a, neuron in enumerate(neurons):
        for r in range(best_v.shape[1]):
            c, p = int(best_ctx[a, r]), int(best_pos[a, r])
            ids = [by_ctx[c][q] for q in range(max(0, p - window), p + 1) if q in by_ctx[c]]
            row = {"neuron": neuron, "rank": r, "activation": float(best_v[a, r]), "context_id": c, "position": p,
                   "token_id": by_ctx[c][p], "context_token_ids": ids}
            if tokenizer is not None:
                row["context"] = tokenizer.decode(ids)
            rows.append(row)
    return pl.DataFrame(rows)
