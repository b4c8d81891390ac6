"""Attribution patching (first-order) and integrated-gradients patching of components.

Steps (Nanda 2023 "Attribution patching"; Syed, Rager & Conmy 2023 "Attribution patching
outperforms automated circuit discovery"; IG: Sundararajan et al. 2017, applied to activations
as in Marks et al. 2024 "Sparse feature circuits", one layer's hook at a time):

1. Cache the source activation ``a_src`` of the component hook at every layer (one forward).
2. AP: one forward on the base prompts with every hooked activation ``a_base`` kept in the
   autograd graph, one backward of the summed per-prompt metric. The gradient reaches each
   activation through ALL later layers (nothing is detached or frozen).
   score = (a_src - a_base) . dm/da |_{a_base}, summed over the component's coordinates.
3. IG: for one layer at a time, the hook's whole activation is moved along the straight line
   a(t) = a_base + t (a_src - a_base) (everything downstream recomputed); the gradient is
   averaged over ``steps`` values of t and dotted with (a_src - a_base). Completeness: the IG
   scores of all components of a layer sum to the exact effect of patching that whole layer
   (exactly, as steps -> infinity; midpoint rule error O(steps^-2)). For a hook with one
   component per layer (an MLP) IG therefore converges to exact patching of that component.

Directions follow `mechflow.attribution.patching`: ``noising`` = base clean, source corrupted.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from mechflow.attribution.patching import (
    Component,
    Direction,
    PairBatch,
    base_and_source,
    cache_hook,
    check_batch,
    check_component,
    hook_name,
)
from mechflow.errors import ConfigError

log = logging.getLogger(__name__)


def ig_points(steps: int, rule: str = "midpoint") -> Tensor:
    """Interpolation coefficients t in [0, 1] (0 = base, 1 = source) for a ``steps``-point rule.

    ``midpoint``: (k + 1/2)/steps (error O(steps^-2)); ``left``: k/steps, k = 0..steps-1;
    ``right``: k/steps, k = 1..steps.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"ig_steps: {steps!r} must be an integer >= 1.")
    k = torch.arange(steps, dtype=torch.float64)
    if rule == "midpoint":
        return (k + 0.5) / steps
    if rule == "left":
        return k / steps
    if rule == "right":
        return (k + 1) / steps
    raise ConfigError(f"ig_rule: {rule!r} is not one of 'midpoint', 'left', 'right'.")


def _reduce(component: str, x: Tensor) -> Tensor:
    """Sum a (diff * grad) product over each component's coordinates -> [n, ...component index]."""
    if component == "head":  # [n, pos, H, d_head] -> [n, H]
        return x.sum(dim=(1, 3))
    if component == "mlp":  # [n, pos, d] -> [n]
        return x.sum(dim=(1, 2))
    return x.sum(dim=2)  # resid [n, pos, d] -> [n, pos]


def attribution_patching(
    model,
    batch: PairBatch,
    component: Component,
    direction: Direction = "noising",
    per_prompt: bool = False,
) -> Tensor:
    """First-order (Taylor) estimate of `exact_patching` for every component at once.

    Returns:
        Same shape as `mechflow.attribution.patching.exact_patching`.
    """
    check_batch(batch)
    check_component(component)
    base, source = base_and_source(batch, direction)
    src = cache_hook(model, source, component)
    names = [hook_name(component, L) for L in range(model.cfg.n_layers)]
    acts: dict[str, Tensor] = {}

    def keep(act: Tensor, hook) -> Tensor:
        if not act.requires_grad:  # frozen weights: make the first hooked tensor a leaf
            act = act.detach().requires_grad_(True)
        acts[hook.name] = act
        return act

    with torch.enable_grad():
        logits = model.run_with_hooks(base, fwd_hooks=[(n, keep) for n in names])
        m = batch.metric(logits)
        grads = torch.autograd.grad(m.sum(), [acts[n] for n in names])
    with torch.no_grad():
        out = torch.stack([
            _reduce(component, (src[L] - acts[n].detach()) * g)
            for L, (n, g) in enumerate(zip(names, grads))
        ], dim=1)  # [n, L, ...]
    out = out.movedim(0, -1)
    return out if per_prompt else out.mean(-1)


def integrated_gradients_patching(
    model,
    batch: PairBatch,
    component: Component,
    direction: Direction = "noising",
    steps: int = 16,
    rule: str = "midpoint",
    layers: list[int] | None = None,
    max_batch: int = 64,
    per_prompt: bool = False,
) -> Tensor:
    """IG along the straight line between base and source activations of one layer's hook.

    Args:
        steps: number of interpolation points; ``rule``: see `ig_points`.
        layers: layers to attribute (default all); the other layers' entries are NaN.
        max_batch: several interpolation points share a forward, stacked along the batch axis.

    Returns:
        Same shape as `attribution_patching`.
    """
    check_batch(batch)
    check_component(component)
    ts = ig_points(steps, rule)
    base, source = base_and_source(batch, direction)
    n = base.shape[0]
    src = cache_hook(model, source, component)
    base_acts = cache_hook(model, base, component)
    layers = list(range(model.cfg.n_layers)) if layers is None else layers
    per_layer: dict[int, Tensor] = {}
    per_fwd = max(1, max_batch // n)
    for L in layers:
        delta = src[L] - base_acts[L]
        grad_sum = torch.zeros_like(delta)
        for start in range(0, steps, per_fwd):
            t = ts[start:start + per_fwd].to(delta.dtype)
            c = len(t)
            path = (base_acts[L].unsqueeze(0) + t.view(c, *[1] * delta.ndim) * delta.unsqueeze(0))
            path = path.reshape(c * n, *delta.shape[1:]).detach().requires_grad_(True)

            def splice(act: Tensor, hook, path=path) -> Tensor:
                return path

            with torch.enable_grad():
                logits = model.run_with_hooks(base.repeat(c, 1), fwd_hooks=[(hook_name(component, L), splice)])
                m = torch.cat([batch.metric(logits[j * n:(j + 1) * n]) for j in range(c)])
                (g,) = torch.autograd.grad(m.sum(), [path])
            grad_sum += g.reshape(c, *delta.shape).sum(0)
        per_layer[L] = _reduce(component, delta * grad_sum / steps)
    ref = next(iter(per_layer.values()))
    out = torch.full((n, model.cfg.n_layers, *ref.shape[1:]), float("nan"), dtype=ref.dtype)
    for L, v in per_layer.items():
        out[:, L] = v
    out = out.movedim(0, -1)
    return out if per_prompt else out.mean(-1)
