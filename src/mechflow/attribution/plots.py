"""Figures for attribution results (matplotlib, Agg backend, written atomically as PNG).

* `plot_head_grid`: layer x head heat map (DLA, ablation, patching, head-type scores), diverging
  colour map centred at 0 for signed scores.
* `plot_logit_lens`: logit difference per lens point (mean and, with several prompts, a band of
  +-1 std).
* `plot_token_saliency`: one row per prompt, a coloured cell per token with its score.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor

from mechflow.plotting import save_figure

log = logging.getLogger(__name__)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_head_grid(scores: Tensor, path: Path, title: str = "", signed: bool | None = None,
                   colorbar_label: str = "score") -> Path:
    """Heat map of ``scores [L, H]`` (layers on the y axis, layer 0 at the top)."""
    s = scores.detach().double().cpu()
    signed = bool((s < 0).any()) if signed is None else signed
    vmax = float(s.abs().max()) or 1.0
    L, H = s.shape
    fig, ax = plt.subplots(figsize=(max(3.0, 0.45 * H + 1.5), max(3.0, 0.25 * L + 1.0)))
    im = ax.imshow(s.numpy(), aspect="auto", cmap="RdBu_r" if signed else "viridis",
                   vmin=-vmax if signed else None, vmax=vmax if signed else None)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_yticks(range(0, L, max(1, L // 15)))
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=colorbar_label)
    return _save(fig, path)


def plot_logit_lens(logit_diff: Tensor, labels: list[str], path: Path, title: str = "logit lens") -> Path:
    """Line plot of ``logit_diff [points]`` or ``[points, n]`` (mean, +-1 std band) per lens point."""
    ld = logit_diff.detach().double().cpu()
    if ld.dim() == 1:
        ld = ld.unsqueeze(1)
    mean = ld.mean(1)
    x = torch.arange(len(labels)).numpy()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * len(labels) + 2), 3.2))
    ax.plot(x, mean.numpy(), marker="o", ms=3)
    if ld.shape[1] > 1:
        std = ld.std(1)
        ax.fill_between(x, (mean - std).numpy(), (mean + std).numpy(), alpha=0.25)
    ax.axhline(0, color="grey", lw=0.8)
    step = max(1, len(labels) // 12)
    ax.set_xticks(x[::step])
    ax.set_xticklabels(labels[::step], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("logit difference")
    ax.set_title(title)
    return _save(fig, path)


def plot_token_saliency(scores: Tensor, token_strs: list[list[str]], path: Path, title: str = "") -> Path:
    """Tokens coloured by ``scores [n, pos]`` (one row per prompt; diverging map centred at 0)."""
    s = scores.detach().double().cpu()
    if s.dim() == 1:
        s = s.unsqueeze(0)
    n, n_pos = s.shape
    vmax = float(s.abs().max()) or 1.0
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * n_pos), 0.5 * n + 1.0))
    im = ax.imshow(s.numpy(), aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    for i in range(n):
        for j in range(n_pos):
            text = token_strs[i][j] if i < len(token_strs) and j < len(token_strs[i]) else ""
            ax.text(j, i, text.replace("\n", "\\n"), ha="center", va="center", fontsize=6, rotation=90)
    ax.set_yticks(range(n))
    ax.set_xticks([])
    ax.set_ylabel("prompt")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="attribution")
    return _save(fig, path)
