"""Zero, mean and resample ablation of attention heads and MLPs.

Steps (zero/mean: Wang et al. 2022 IOI, Conmy et al. 2023; resample ablation: Chan et al. 2022
"Causal scrubbing"):

1. Replacement activation per component (heads: ``blocks.L.attn.hook_z[:, :, h]``, every
   position; MLPs: ``blocks.L.hook_mlp_out``):
   * ``zero``: 0.
   * ``mean``: the mean over the reference prompts (default: the prompts themselves; pass the
     task dataset's prompts of this length) at EACH position, ``[pos, ...]``, the same for every
     prompt.
   * ``resample``: prompt ``i`` receives the activation of reference prompt ``perm[i]``; with the
     prompts as their own reference ``perm`` is a seeded derangement (no prompt keeps its own
     activation), otherwise a seeded random choice with replacement.
2. Run the prompts with one component replaced, everything downstream recomputed; several
   components share one forward (the batch is stacked, as in `mechflow.attribution.patching`).
3. Score = ``m(ablated) - m(clean)`` per prompt (mean over prompts unless ``per_prompt``).

Hooks only: works unchanged on SmolLM2 and Gemma-3 (Gemma's ``hook_mlp_out`` is after
``ln2_post``, so an MLP ablation removes the post-normed output, i.e. the residual write).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import polars as pl
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechflow.attribution.config import AnalysisConfig
from mechflow.attribution.lens import head_frame, layer_frame
from mechflow.contracts.hooks import COMPONENT_HOOKS
from mechflow.errors import ConfigError

log = logging.getLogger(__name__)

HOOKS = {k: COMPONENT_HOOKS[k] for k in ("head", "mlp")}


def derangement(n: int, seed: int) -> Tensor:
    """Seeded uniformly random permutation of ``range(n)`` without fixed points (rejection)."""
    if n < 2:
        raise ConfigError("ablation.method=resample needs at least 2 prompts (or reference_tokens)")
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        if not torch.any(perm == torch.arange(n)):
            return perm


@torch.no_grad()
def replacement_activations(model, tokens: Tensor, component: str, method: str,
                            reference_tokens: Tensor | None = None, seed: int = 0) -> dict[int, Tensor]:
    """Layer -> the replacement for every prompt, shaped like the hook's activation ``[n, pos, ...]``."""
    if component not in HOOKS:
        raise ConfigError(f"ablation.component: {component!r} is not one of {sorted(HOOKS)}")
    AnalysisConfig(ablations=(method,))  # the analysis group's own check of an ablation method, stated once
    names = {f"blocks.{l}.{HOOKS[component]}": l for l in range(model.cfg.n_layers)}
    n = tokens.shape[0]
    own = reference_tokens is None
    ref = tokens if own else reference_tokens
    if ref.shape[1] != tokens.shape[1]:
        raise ConfigError(f"ablation reference_tokens: length {ref.shape[1]} differs from the prompts' "
                          f"{tokens.shape[1]}; use the dataset bucket of the same token length")
    if method == "zero":
        _, cache = model.run_with_cache(tokens[:1], names_filter=lambda x: x in names)
        return {l: torch.zeros_like(cache[name]).expand(n, *cache[name].shape[1:]) for name, l in names.items()}
    _, cache = model.run_with_cache(ref, names_filter=lambda x: x in names)
    if method == "mean":
        return {l: cache[name].mean(0, keepdim=True).expand(n, *cache[name].shape[1:]) for name, l in names.items()}
    if own:
        perm = derangement(n, seed)
    else:
        perm = torch.randint(0, ref.shape[0], (n,), generator=torch.Generator().manual_seed(seed))
    return {l: cache[name][perm] for name, l in names.items()}


@torch.no_grad()
def ablate_components(model, tokens: Tensor, metric: Callable[[Tensor], Tensor], component: str = "head",
                      method: str = "zero", reference_tokens: Tensor | None = None, seed: int = 0,
                      max_batch: int = 64, per_prompt: bool = False, progress: bool = False) -> Tensor:
    """Metric change from ablating each head (``[L, H]``) or MLP (``[L]``) on its own.

    Args:
        tokens: ``[n, pos]`` prompts (clean).
        metric: per-prompt metric of the logits.
        component: ``head`` | ``mlp``; method: ``zero`` | ``mean`` | ``resample`` (module doc).
        reference_tokens: prompts the mean / resampled activations come from (same length).
        per_prompt: return ``[..., n]`` instead of the mean over prompts.
    """
    repl = replacement_activations(model, tokens, component, method, reference_tokens, seed)
    n = tokens.shape[0]
    L, H = model.cfg.n_layers, model.cfg.n_heads
    comps = [(l, h) for l in range(L) for h in range(H)] if component == "head" else [(l, None) for l in range(L)]
    m_clean = metric(model(tokens))
    out = torch.empty(len(comps), n, dtype=m_clean.dtype)
    copies = max(1, max_batch // n)
    for start in tqdm(range(0, len(comps), copies), disable=not progress, desc=f"{method} ablation"):
        chunk = comps[start:start + copies]
        by_layer: dict[int, list[tuple[int, int | None]]] = {}
        for j, (l, h) in enumerate(chunk):
            by_layer.setdefault(l, []).append((j, h))
        hooks = [(f"blocks.{l}.{HOOKS[component]}", _replace(repl[l], items, n)) for l, items in by_layer.items()]
        logits = model.run_with_hooks(tokens.repeat(len(chunk), 1), fwd_hooks=hooks)
        out[start:start + len(chunk)] = torch.stack(
            [metric(logits[j * n:(j + 1) * n]) for j in range(len(chunk))]) - m_clean
    shape = (L, H) if component == "head" else (L,)
    out = out.reshape(*shape, n)
    return out if per_prompt else out.mean(-1)


def _replace(src: Tensor, items: list[tuple[int, int | None]], n: int):
    def hook(act: Tensor, hook=None) -> Tensor:
        for j, h in items:
            rows = slice(j * n, (j + 1) * n)
            if h is None:
                act[rows] = src
            else:
                act[rows, :, h] = src[:, :, h]
        return act
    return hook


def ablation_frame(scores: Tensor, component: str, method: str) -> pl.DataFrame:
    """``[L, H]`` (heads) or ``[L]`` (MLPs) mean scores -> component/layer/head/score/method rows."""
    name = f"{method}_ablation"
    return head_frame(scores, name) if component == "head" else layer_frame(scores, name, "mlp")
