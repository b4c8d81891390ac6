"""The peak-RSS scaling figure of a `MeasuredCosts` measurement."""

from __future__ import annotations

from pathlib import Path

from mechflow.contracts.plan import MeasuredCosts


def rss_scaling_figure(costs: MeasuredCosts, out: Path) -> Path:
    """Peak resident memory of harvest and SAE training against corpus tokens (the scaling series)."""
    import matplotlib.pyplot as plt

    from mechflow.plotting import save_figure, style

    with style():
        return _draw(plt, costs, out, save_figure)


def _draw(plt, costs: MeasuredCosts, out: Path, save_figure) -> Path:
    series = [p for p in costs.harvest if p.stop_layer == 2]
    train = [p for p in costs.training if p.tokens == p.corpus_tokens]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot([p.tokens for p in series], [p.peak_rss_mb for p in series], "o-",
            label="harvest (4 hooks, 2 304 values/token)")
    ax.plot([p.tokens for p in train], [p.peak_rss_mb for p in train], "s-",
            label="SAE training (d_sae 1 152, one pass over the harvest)")
    ax.set_xscale("log")
    ax.set_ylim(0, max(p.peak_rss_mb for p in (*series, *train)) * 1.3)
    ax.set_xlabel("tokens (corpus = training tokens)")
    ax.set_ylabel("peak RSS of the process (MB)")
    ax.set_title(f"SmolLM2-135M, {costs.threads} thread, commit {costs.commit}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    path = save_figure(fig, out)
    plt.close(fig)
    return path
