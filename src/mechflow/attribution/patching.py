"""Exact activation patching: the reference every approximate attribution is tested against.

Steps (Meng et al. 2022 "causal tracing"; Wang et al. 2022 IOI; Heimersheim & Nanda 2024 "How to
use and interpret activation patching"):

1. Run the *source* prompts once and cache the component's activation at every layer
   (`hook_z` per head, `hook_mlp_out` per MLP, `hook_resid_pre` per layer x position).
2. Run the *base* prompts with one component's activation overwritten by the source activation,
   recomputing everything downstream, and read the metric.
3. effect = m(patched base run) - m(base run), per prompt; the batch effect is the mean.

Directions: ``"noising"`` (the brief's clean->corrupted: run the clean prompts, splice in the
corrupted activation; a large negative effect marks an important component) and ``"denoising"``
(corrupted->clean: run the corrupted prompts, splice in the clean activation).

Several patches share one forward pass: the base prompts are repeated ``c`` times along the batch
axis and copy ``j`` receives patch ``j`` (``c = max_batch // n_prompts``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import torch
from torch import Tensor

from mechflow.contracts import hooks as contract_hooks
from mechflow.errors import ConfigError

log = logging.getLogger(__name__)

Component = Literal["head", "mlp", "resid"]
Direction = Literal["noising", "denoising"]

#: TransformerLens hook (suffix under ``blocks.{L}.``) that each component kind patches.
COMPONENT_HOOKS: dict[str, str] = {k: contract_hooks.COMPONENT_HOOKS[k] for k in ("head", "mlp", "resid")}


class PairBatch(Protocol):
    """What every patching/attribution method consumes (built by the task package).

    Attributes:
        clean_tokens: ``[n, pos]`` token ids.
        corrupted_tokens: ``[n, pos]`` token ids, same shape.
        metric: ``logits [n, pos, vocab] -> [n]``, per prompt, differentiable. The batch metric is
            the mean over prompts.
    """

    clean_tokens: Tensor
    corrupted_tokens: Tensor
    metric: Callable[[Tensor], Tensor]


@dataclass
class TokenPairs:
    """Minimal concrete `PairBatch` (tests, benchmarks)."""

    clean_tokens: Tensor
    corrupted_tokens: Tensor
    metric: Callable[[Tensor], Tensor]

    def __post_init__(self) -> None:
        check_batch(self)


def check_batch(batch: PairBatch) -> None:
    """Raise `ConfigError` unless clean and corrupted tokens are equal-shaped ``[n, pos]`` tensors."""
    c, k = batch.clean_tokens, batch.corrupted_tokens
    if c.ndim != 2 or c.shape != k.shape:
        raise ConfigError(
            f"batch.corrupted_tokens: shape {tuple(k.shape)} must equal batch.clean_tokens shape "
            f"{tuple(c.shape)} and be [n, pos]; pad or filter prompt pairs to equal token length."
        )


def check_direction(direction: str) -> None:
    if direction not in ("noising", "denoising"):
        raise ConfigError(f"direction: {direction!r} is not one of 'noising', 'denoising'.")


def check_component(component: str) -> None:
    if component not in COMPONENT_HOOKS:
        raise ConfigError(f"component: {component!r} is not one of {sorted(COMPONENT_HOOKS)}.")


def base_and_source(batch: PairBatch, direction: str) -> tuple[Tensor, Tensor]:
    """(tokens the patched forward runs on, tokens the spliced activation comes from)."""
    check_direction(direction)
    if direction == "noising":
        return batch.clean_tokens, batch.corrupted_tokens
    return batch.corrupted_tokens, batch.clean_tokens


def hook_name(component: str, layer: int) -> str:
    return f"blocks.{layer}.{COMPONENT_HOOKS[component]}"


def component_shape(model, component: str, n_pos: int) -> tuple[int, ...]:
    """Shape of the per-component result: heads [L, H], MLPs [L], residual [L, pos]."""
    L = model.cfg.n_layers
    return {"head": (L, model.cfg.n_heads), "mlp": (L,), "resid": (L, n_pos)}[component]


def metric_per_copy(metric: Callable[[Tensor], Tensor], logits: Tensor, n: int) -> Tensor:
    """Apply a per-prompt metric to ``c`` stacked copies of an ``n``-prompt batch -> ``[c, n]``."""
    c = logits.shape[0] // n
    return torch.stack([metric(logits[j * n:(j + 1) * n]) for j in range(c)])


@torch.no_grad()
def cache_hook(model, tokens: Tensor, component: str) -> dict[int, Tensor]:
    """Activations of ``component``'s hook at every layer for ``tokens``."""
    names = {hook_name(component, L): L for L in range(model.cfg.n_layers)}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return {L: cache[n] for n, L in names.items()}


@torch.no_grad()
def exact_patching(
    model,
    batch: PairBatch,
    component: Component,
    direction: Direction = "noising",
    max_batch: int = 64,
    per_prompt: bool = False,
    layers: list[int] | None = None,
) -> Tensor:
    """Exact effect of patching each component on its own, downstream recomputed.

    Args:
        model: TransformerLens HookedTransformer (read-only).
        batch: clean/corrupted tokens and per-prompt metric.
        component: ``"head"`` (all positions of one head's ``hook_z``), ``"mlp"`` (``hook_mlp_out``),
            ``"resid"`` (``hook_resid_pre`` at one layer and one position).
        direction: ``"noising"`` (clean run, corrupted activation) or ``"denoising"``.
        max_batch: largest number of sequences in one forward (copies x prompts).
        per_prompt: return one effect per prompt (trailing axis ``n``) instead of the mean.
        layers: patch only these layers (default all); other layers' entries are NaN.

    Returns:
        ``m(patched) - m(base)``: heads ``[L, H]``, MLPs ``[L]``, residual ``[L, pos]``
        (``[..., n]`` with ``per_prompt``).
    """
    check_batch(batch)
    check_component(component)
    if max_batch < 1:
        raise ConfigError(f"max_batch: {max_batch} must be >= 1.")
    base, source = base_and_source(batch, direction)
    n, n_pos = base.shape
    src = cache_hook(model, source, component)
    m_base = batch.metric(model(base))  # [n]
    shape = component_shape(model, component, n_pos)
    comps = [tuple(int(i) for i in idx)
             for idx in torch.cartesian_prod(*[torch.arange(s) for s in shape]).reshape(-1, len(shape))]
    todo = [i for i, c in enumerate(comps) if layers is None or c[0] in layers]
    copies = max(1, max_batch // n)
    out = torch.full((len(comps), n), float("nan"), dtype=m_base.dtype)
    for start in range(0, len(todo), copies):
        rows = todo[start:start + copies]
        chunk = [comps[i] for i in rows]
        by_layer: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
        for j, comp in enumerate(chunk):
            by_layer.setdefault(comp[0], []).append((j, comp[1:]))
        hooks = [(hook_name(component, L), _splice_hook(src[L], items, n)) for L, items in by_layer.items()]
        logits = model.run_with_hooks(base.repeat(len(chunk), 1), fwd_hooks=hooks)
        out[rows] = metric_per_copy(batch.metric, logits, n) - m_base
    out = out.reshape(*shape, n)
    return out if per_prompt else out.mean(-1)


def _splice_hook(src: Tensor, items: list[tuple[int, tuple[int, ...]]], n: int):
    def hook(act: Tensor, hook=None) -> Tensor:
        for j, sub in items:
            rows = slice(j * n, (j + 1) * n)
            if not sub:  # whole MLP output
                act[rows] = src
            elif act.ndim == 4:  # hook_z [b, pos, head, d_head]
                act[rows, :, sub[0]] = src[:, :, sub[0]]
            else:  # hook_resid_pre [b, pos, d_model] at one position
                act[rows, sub[0]] = src[:, sub[0]]
        return act

    return hook


@torch.no_grad()
def patch_whole_layer(model, batch: PairBatch, component: Component, layer: int,
                      direction: Direction = "noising") -> Tensor:
    """Exact effect (per prompt ``[n]``) of patching every component of one layer's hook at once.

    The completeness identity of integrated gradients refers to this quantity.
    """
    check_component(component)
    base, source = base_and_source(batch, direction)
    src = cache_hook(model, source, component)[layer]
    m_base = batch.metric(model(base))

    def hook(act: Tensor, hook=None) -> Tensor:
        return src.clone()

    logits = model.run_with_hooks(base, fwd_hooks=[(hook_name(component, layer), hook)])
    return batch.metric(logits) - m_base
