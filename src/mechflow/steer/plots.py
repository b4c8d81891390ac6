"""The `steer` stage's figures: the layer scan and the strength sweeps (through `mechflow.plotting`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mechflow.plotting import save_figure, style


def plot_layers(rows: Sequence[dict], chosen: int, path: Path, title: str) -> None:
    """Held-out AUC and probe accuracy per layer (left), standardised gap (right), the chosen layer."""
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in rows]
    with style():
        fig, ax = plt.subplots(figsize=(7.5, 3.6))
        ax.plot(layers, [r["auc"] for r in rows], "o-", label="AUC of the projection (held out)")
        ax.plot(layers, [r["probe_accuracy"] for r in rows], "s--", label="probe accuracy (held out)")
        low = min([r["auc"] for r in rows] + [r["probe_accuracy"] for r in rows])
        ax.set_ylim(min(0.4, low - 0.03), 1.02)
        ax.set_xlabel("layer (residual stream entering the block)")
        ax.set_ylabel("AUC / accuracy")
        ax2 = ax.twinx()
        gaps = [np.nan if r["separation"] is None else r["separation"] for r in rows]  # null: infinite
        ax2.plot(layers, gaps, "^:", color="tab:green", label="standardised gap")
        ax2.set_ylabel("(mean pos - mean neg) / pooled std")
        ax.axvline(chosen, color="grey", lw=1, label=f"steered: layer {chosen}")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="upper center",
                  bbox_to_anchor=(0.5, -0.16), ncol=4, frameon=False)
        ax.set_title(title, fontsize=9)
        save_figure(fig, path)
        plt.close(fig)


def plot_sweeps(sweeps: Sequence[dict], controls: dict | None, target: float, path: Path, title: str) -> None:
    """Normalised effect against strength for every intervention, the target, the controls; the side
    effects of the contrast direction.

    `sweeps`: ``{"label", "operation", "alphas", "effects", "kl", "ce", "chosen"}`` per intervention.
    """
    import matplotlib.pyplot as plt

    with style():
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
        for ax, ops, xlabel in ((axes[0], ("add",), "alpha (units of the mean gap)"),
                                (axes[1], ("scale", "set"), "k (a -> k a) or value (a -> v)")):
            for s in sweeps:
                if s["operation"] not in ops:
                    continue
                pts = sorted((a, e) for a, e in zip(s["alphas"], s["effects"]) if e is not None)
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=s["label"])
                if s["chosen"] is not None:
                    e = dict(pts).get(s["chosen"])
                    ax.plot([s["chosen"]], [e], "*", ms=12, color=line.get_color())
            ax.axhline(target, color="red", lw=0.8, ls="--", label=f"target {target:+g}")
            ax.axhline(0, color="black", lw=0.5)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("normalised effect on held-out positives")
        if controls is not None:
            xs = [controls["alpha"]] * len(controls["random_effects"])
            axes[0].plot(xs, controls["random_effects"], "x", color="grey", ms=4, label="random directions")
            if controls["shuffled_effect"] is not None:
                axes[0].plot([controls["alpha"]], [controls["shuffled_effect"]], "D", color="black", ms=4,
                             label="shuffled labels")
        axes[0].set_title("contrast direction", fontsize=9)
        axes[1].set_title("dictionary features", fontsize=9)
        for ax in axes[:2]:
            ax.legend(fontsize=6)
        contrast = [s for s in sweeps if s["operation"] == "add"]
        ax = axes[2]
        for s in contrast:
            pts = sorted(zip(s["alphas"], s["kl"], s["ce"]))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label="KL on negative prompts")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], "s-", ms=3, label="CE increase on corpus")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xlabel("alpha")
        ax.set_ylabel("nats")
        ax.set_title("side effects of the contrast direction", fontsize=9)
        ax.legend(fontsize=6)
        fig.suptitle(title, fontsize=10)
        save_figure(fig, path)
        plt.close(fig)
