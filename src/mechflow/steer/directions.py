"""Contrast directions and linear probes of the residual stream, one per layer, and the layer choice.

* **Contrast direction** (difference of means; ActAdd, Turner et al. 2023; CAA, Rimsky et al. 2024):
  ``d_l = mean(x_l | positive) - mean(x_l | negative)`` over the training prompts, ``x_l`` the
  residual stream entering block ``l`` (``blocks.{l}.hook_resid_pre``) at the final prompt token
  (``position: last``) or averaged over the tokens after BOS (``position: mean``).
* **Held-out separation**: the projections ``x . d_l`` of the held-out prompts; AUC (positives above
  negatives; Mann-Whitney, ties count one half) and the standardised gap
  ``(mean_pos - mean_neg) / pooled std``. The layer steered is the one of highest AUC, ties broken by
  the standardised gap (with many layers at AUC 1 the gap tells them apart).
* **Probe**: L2-regularised logistic regression on the standardised training activations, fitted
  by L-BFGS in float64 (written here with torch, already a dependency, rather than adding
  scikit-learn for one convex fit); its held-out accuracy and the cosine of its weight with ``d_l``.
* **Shuffled-label control**: the same difference of means with the training labels permuted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


def resid_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


@torch.no_grad()
def residual_activations(model: Any, tokens: Tensor, layers: list[int], position: str, start: int,
                         max_batch: int = 64) -> Tensor:
    """``[len(layers), n, d_model]`` residual stream of `tokens` (one token length) at each layer."""
    from mechflow.harvest.hooks import stop_layer

    hooks = [resid_hook(layer) for layer in layers]
    out = []
    for i in range(0, len(tokens), max_batch):
        _, cache = model.run_with_cache(tokens[i:i + max_batch], names_filter=hooks,
                                        stop_at_layer=stop_layer(hooks, model.cfg.n_layers))
        acts = torch.stack([cache[h] for h in hooks])  # [L, b, pos, d]
        out.append(acts[:, :, -1] if position == "last" else acts[:, :, start:].mean(2))
    return torch.cat(out, 1).double()


def contrast_direction(pos: Tensor, neg: Tensor) -> Tensor:
    """Difference of means ``[..., d]`` of ``pos [..., n_pos, d]`` and ``neg [..., n_neg, d]``."""
    return pos.mean(-2) - neg.mean(-2)


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive scores above a negative), ties one half (the Mann-Whitney U / (n_pos n_neg))."""
    pos, neg = np.asarray(pos, float)[:, None], np.asarray(neg, float)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def standardised_gap(pos: np.ndarray, neg: np.ndarray) -> float:
    """(mean_pos - mean_neg) / pooled standard deviation (Cohen's d); ±inf when the classes differ and
    neither varies (`json_gap` writes that as null)."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    n1, n2 = len(pos), len(neg)
    var = ((n1 - 1) * pos.var(ddof=1) + (n2 - 1) * neg.var(ddof=1)) / max(n1 + n2 - 2, 1)
    gap = pos.mean() - neg.mean()
    return float(gap / np.sqrt(var)) if var > 0 else float(np.sign(gap) * np.inf if gap else 0.0)


def json_gap(gap: float) -> float | None:
    """A standardised gap as written to JSON: null when infinite (no within-class spread at all)."""
    return gap if np.isfinite(gap) else None


def fit_probe(x: Tensor, y: Tensor, l2: float, max_iter: int = 200) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Logistic regression of ``y in {0,1}`` on ``x [n, d]``: ``(w, b, mean, std)`` in standardised units.

    Minimises mean BCE + l2/2 |w|^2 over the standardised ``(x - mean) / std`` (L-BFGS, float64).
    """
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")
    target = y.double()

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, target) + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach(), mean, std


def probe_accuracy(probe: tuple[Tensor, Tensor, Tensor, Tensor], x: Tensor, y: Tensor) -> float:
    w, b, mean, std = probe
    pred = ((x.double() - mean) / std) @ w + b > 0
    return float((pred == y.bool()).double().mean())


def probe_direction(probe: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
    """The probe's weight in activation space (w / std), pointing to the positive class."""
    w, _, _, std = probe
    return w / std


@dataclass
class LayerScan:
    """Per layer: the contrast direction and its held-out separation, the probe and its accuracy."""

    layers: list[int]
    directions: Tensor  # [L, d]
    probes: Tensor  # [L, d] probe weights in activation space
    rows: list[dict]
    chosen: int  # index into layers

    @property
    def layer(self) -> int:
        return self.layers[self.chosen]

    @property
    def direction(self) -> Tensor:
        return self.directions[self.chosen]


def scan_layers(layers: list[int], train_pos: Tensor, train_neg: Tensor, test_pos: Tensor, test_neg: Tensor,
                l2: float, layer: int | None = None) -> LayerScan:
    """Directions, probes and held-out separation at every layer (inputs ``[L, n, d]``); the layer
    steered is `layer` when given, else the best by (AUC, standardised gap), earliest on ties."""
    dirs = contrast_direction(train_pos, train_neg)
    rows, probes, gaps = [], [], []
    for i, lay in enumerate(layers):
        d = dirs[i]
        p_pos, p_neg = (test_pos[i] @ d).numpy(), (test_neg[i] @ d).numpy()
        x_train = torch.cat([train_pos[i], train_neg[i]])
        y_train = torch.cat([torch.ones(len(train_pos[i])), torch.zeros(len(train_neg[i]))])
        x_test = torch.cat([test_pos[i], test_neg[i]])
        y_test = torch.cat([torch.ones(len(test_pos[i])), torch.zeros(len(test_neg[i]))])
        probe = fit_probe(x_train, y_train, l2)
        w = probe_direction(probe)
        probes.append(w)
        cos = float(w @ d / (w.norm() * d.norm())) if float(w.norm() * d.norm()) > 0 else 0.0
        gaps.append(standardised_gap(p_pos, p_neg))
        rows.append({"layer": lay, "hook": resid_hook(lay), "norm": float(d.norm()), "auc": auc(p_pos, p_neg),
                     "separation": json_gap(gaps[-1]),
                     "probe_train_accuracy": probe_accuracy(probe, x_train, y_train),
                     "probe_accuracy": probe_accuracy(probe, x_test, y_test), "probe_cosine": cos})
    if layer is not None:
        chosen = layers.index(layer)
    else:
        chosen = max(range(len(layers)), key=lambda i: (rows[i]["auc"], gaps[i], -i))
    return LayerScan(layers, dirs, torch.stack(probes), rows, chosen)


def shuffled_direction(pos: Tensor, neg: Tensor, generator: torch.Generator) -> Tensor:
    """Difference of means after a random relabelling of the pooled ``[n, d]`` activations."""
    pooled = torch.cat([pos, neg])
    perm = torch.randperm(len(pooled), generator=generator)
    return contrast_direction(pooled[perm[:len(pos)]], pooled[perm[len(pos):]])


def random_directions(n: int, d: int, norm: float, generator: torch.Generator) -> Tensor:
    """``[n, d]`` isotropic Gaussian directions rescaled to `norm`."""
    r = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return r / r.norm(dim=1, keepdim=True) * norm
