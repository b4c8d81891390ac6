"""Token saliency on the input embeddings: gradient, gradient x input, integrated gradients.

Steps (Simonyan et al. 2014 "Deep inside convolutional networks" for gradients; Shrikumar et al.
2016 for gradient x input; Sundararajan et al. 2017 "Axiomatic attribution for deep networks"
for integrated gradients):

1. The input embedding ``e`` is the residual entering block 0 (``blocks.0.hook_resid_pre``:
   token embeddings, plus positional embeddings on absolute-position models, plus any embedding
   scale such as Gemma's); it is spliced in through a hook so every method differentiates the
   real forward pass.
2. Gradient: ``g = dm/de`` per prompt (prompts are independent, so one backward of the summed
   metric gives every prompt's gradient). Per token: ``||g[pos]||_2``.
3. Gradient x input: ``sum_d g[pos, d] * e[pos, d]``.
4. Integrated gradients from a baseline ``e'`` (the CORRUPTED prompt's embeddings, the default,
   or ZERO): ``IG[pos] = sum_d (e - e')[pos, d] * mean_k g(e' + t_k (e - e'))[pos, d]`` with
   ``t_k`` from `mechflow.attribution.gradients.ig_points` (midpoint rule, ``steps`` points).
   Completeness: ``sum_pos IG = m(e) - m(e')`` as ``steps -> inf``; the midpoint rule's error
   falls as O(steps^-2). With the corrupted baseline ``m(e')`` is the metric of the corrupted
   prompt (on rotary models the embedding is the only token-dependent input).
5. Zero baseline on RMSNorm models: near ``e = 0`` block 0's norm ``x / sqrt(mean(x^2) + eps)``
   jumps from 0 to unit scale within ``t ~ sqrt(eps) / rms(e)`` (~1e-3), so almost all of the
   integral sits in a spike at the start of the path and uniform points miss it (measured on the
   tiny model: error still ~50% of m(e) - m(e') at 512 points). The same integral is therefore
   computed after the change of variables ``t = u^warp`` (``dt = warp u^(warp-1) du``, midpoint in
   ``u``), which clusters points near ``t = 0``; ``warp=None`` picks 1 for the corrupted baseline
   and 4 for the zero baseline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import polars as pl
import torch
from torch import Tensor

from mechflow.attribution.gradients import ig_points
from mechflow.contracts.hooks import INPUT_HOOK
from mechflow.errors import ConfigError

log = logging.getLogger(__name__)

EMBED_HOOK = INPUT_HOOK
Metric = Callable[[Tensor], Tensor]


def input_embeddings(model, tokens: Tensor) -> Tensor:
    """``[n, pos, d_model]`` the residual entering block 0 for ``tokens``."""
    with torch.no_grad():
        return model(tokens, stop_at_layer=0)


def metric_at_embeddings(model, tokens: Tensor, embeddings: Tensor, metric: Metric) -> Tensor:
    """``metric`` of the forward pass whose block-0 input is replaced by ``embeddings`` -> ``[n]``.

    ``tokens`` only fix the batch shape (and any attention mask); their embeddings are replaced.
    """
    logits = model.run_with_hooks(tokens, fwd_hooks=[(EMBED_HOOK, lambda act, hook: embeddings)])
    return metric(logits)


def embedding_gradient(model, tokens: Tensor, metric: Metric, embeddings: Tensor | None = None
                       ) -> tuple[Tensor, Tensor]:
    """(``dm/de [n, pos, d]``, ``m [n]``) at ``embeddings`` (default: ``tokens``' own)."""
    e = input_embeddings(model, tokens) if embeddings is None else embeddings
    e = e.detach().requires_grad_(True)
    with torch.enable_grad():
        m = metric_at_embeddings(model, tokens, e, metric)
        (g,) = torch.autograd.grad(m.sum(), [e])
    return g, m.detach()


@dataclass
class SaliencyResult:
    """Per-token saliency ``[n, pos]`` of one method, with the metric values it explains.

    Attributes:
        method: ``gradient`` | ``grad_x_input`` | ``integrated_gradients``.
        scores: ``[n, pos]``.
        metric: ``[n]`` metric of the prompt.
        baseline_metric: ``[n]`` metric at the IG baseline (IG only).
        steps: IG interpolation points (IG only).
    """

    method: str
    scores: Tensor
    metric: Tensor
    baseline_metric: Tensor | None = None
    steps: int | None = None

    @property
    def completeness_error(self) -> Tensor:
        """``sum_pos IG - (m - m_baseline)`` per prompt (IG only)."""
        if self.baseline_metric is None:
            raise ConfigError(f"completeness_error is defined for integrated gradients, not {self.method}")
        return self.scores.sum(-1) - (self.metric - self.baseline_metric)

    def to_frame(self, tokens: Tensor | None = None) -> pl.DataFrame:
        """One row per (prompt, position): prompt, position, token_id, score, method."""
        n, n_pos = self.scores.shape
        s = self.scores.detach().double().cpu()
        data = {"prompt": [i for i in range(n) for _ in range(n_pos)], "position": list(range(n_pos)) * n,
                "score": s.reshape(-1).tolist(), "method": [self.method] * (n * n_pos)}
        if tokens is not None:
            data["token_id"] = tokens.reshape(-1).tolist()
        return pl.DataFrame(data)


def gradient_saliency(model, tokens: Tensor, metric: Metric) -> tuple[SaliencyResult, SaliencyResult]:
    """Gradient norm and gradient x input per token (one forward + one backward)."""
    e = input_embeddings(model, tokens)
    g, m = embedding_gradient(model, tokens, metric, e)
    return (SaliencyResult("gradient", g.norm(dim=-1), m),
            SaliencyResult("grad_x_input", (g * e).sum(-1), m))


def integrated_gradients(model, tokens: Tensor, metric: Metric, baseline: str | Tensor = "corrupted",
                         corrupted_tokens: Tensor | None = None, steps: int = 32, rule: str = "midpoint",
                         warp: float | None = None, max_batch: int = 64) -> SaliencyResult:
    """Integrated gradients of ``metric`` w.r.t. the input embeddings, summed over ``d_model``.

    Args:
        baseline: ``"corrupted"`` (embeddings of ``corrupted_tokens``), ``"zero"``, or a tensor
            ``[n, pos, d_model]``.
        steps, rule: interpolation points in ``u`` (see `ig_points`).
        warp: path parameter ``t = u^warp`` (see the module docstring); None -> 4 for the zero
            baseline, else 1 (plain IG quadrature).
        max_batch: sequences per forward (several interpolation points share one).

    Returns:
        ``SaliencyResult`` with ``scores [n, pos]``, ``metric`` (clean), ``baseline_metric``.
    """
    e = input_embeddings(model, tokens)
    if isinstance(baseline, Tensor):
        base = baseline.to(e.dtype)
        if base.shape != e.shape:
            raise ConfigError(f"baseline: shape {tuple(base.shape)} must equal the embeddings' {tuple(e.shape)}")
    elif baseline == "zero":
        base = torch.zeros_like(e)
    elif baseline == "corrupted":
        if corrupted_tokens is None or corrupted_tokens.shape != tokens.shape:
            raise ConfigError("baseline='corrupted' needs corrupted_tokens of the clean tokens' shape")
        base = input_embeddings(model, corrupted_tokens)
    else:
        raise ConfigError(f"saliency.baseline: {baseline!r} is not one of 'corrupted', 'zero' or a tensor")
    if warp is None:
        warp = 4.0 if isinstance(baseline, str) and baseline == "zero" else 1.0
    if warp < 1:
        raise ConfigError(f"saliency.warp: {warp} must be >= 1")
    us = ig_points(steps, rule).to(e.dtype)
    ts, weights = us.pow(warp), warp * us.pow(warp - 1)  # dt = warp u^(warp-1) du
    n = tokens.shape[0]
    delta = e - base
    grad_sum = torch.zeros_like(e)
    per_fwd = max(1, max_batch // n)
    for start in range(0, steps, per_fwd):
        t, w = ts[start:start + per_fwd], weights[start:start + per_fwd]
        c = len(t)
        path = (base.unsqueeze(0) + t.view(c, 1, 1, 1) * delta.unsqueeze(0)).reshape(c * n, *e.shape[1:])
        copies = tokens.repeat(c, 1)

        def stacked_metric(logits: Tensor, c=c) -> Tensor:
            return torch.cat([metric(logits[j * n:(j + 1) * n]) for j in range(c)])

        g, _ = embedding_gradient(model, copies, stacked_metric, path)
        grad_sum += (w.view(c, 1, 1, 1) * g.reshape(c, *e.shape)).sum(0)
    with torch.no_grad():
        m_clean = metric_at_embeddings(model, tokens, e, metric)
        m_base = metric_at_embeddings(model, tokens, base, metric)
    scores = (delta * grad_sum / steps).sum(-1)
    return SaliencyResult("integrated_gradients", scores, m_clean, m_base, steps)
