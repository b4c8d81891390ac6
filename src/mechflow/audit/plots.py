"""The `audit` stage's figure: every probe's headline numbers with their confidence intervals."""

from __future__ import annotations

from pathlib import Path

from mechflow.plotting import save_figure, style


def _err(e: dict) -> tuple[float, list[float]]:
    """(value, [below, above]) error-bar lengths; a percentile interval of a non-smooth statistic (a max
    of differences) need not contain the estimate, so a side outside it is drawn with length 0."""
    v = e["value"]
    if v is None or e.get("ci_low") is None:
        return (v if v is not None else float("nan")), [0.0, 0.0]
    return v, [max(0.0, v - e["ci_low"]), max(0.0, e["ci_high"] - v)]


def plot_audit(doc: dict, path: Path) -> None:
    """One panel per decision probe (mean score per group, CI bars, the gap's permutation p), one panel
    of rates (paraphrase agreement, refusal, over-refusal, API accuracy of the white-box tasks)."""
    import matplotlib.pyplot as plt

    decisions = [p for p in doc["probes"] if p["decision"]]
    n = len(decisions) + 1
    with style():
        fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.8), squeeze=False)
        for ax, p in zip(axes[0], decisions):
            d = p["decision"]
            groups = d["groups"]
            for k, g in enumerate(groups):
                v, e = _err(d["mean_score"][g])
                ax.errorbar([k], [v], yerr=[[e[0]], [e[1]]], fmt="o", capsize=3)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xticks(range(len(groups)), [g.replace("_", "\n") for g in groups], fontsize=7)
            ax.set_ylabel("log p(favourable) - log p(unfavourable)")
            gap = d["score_gap"]
            ax.set_title(f"{p['name']}: gap {gap['value']:.2f} [{gap['ci_low']:.2f}, {gap['ci_high']:.2f}], "
                         f"perm. p = {gap['p_value']:.3g}", fontsize=8)
        ax = axes[0][-1]
        rows = []
        for p in doc["probes"]:
            m = p["metrics"]
            if p["kind"] == "paraphrase":
                rows += [(f"{p['name']}\nagreement", m["agreement"]), (f"{p['name']}\naccuracy", m["accuracy"])]
            elif p["kind"] == "refusal":
                rows += [(f"{p['name']}\nrefused harmful", m["refusal_rate_harmful"]),
                         (f"{p['name']}\nrefused benign", m["over_refusal_rate_benign"])]
        rows += [(f"API accuracy\n{w['task']}", w["api_accuracy"]) for w in doc["whitebox"]]
        for k, (label, e) in enumerate(rows):
            v, err = _err(e)
            ax.errorbar([v], [k], xerr=[[err[0]], [err[1]]], fmt="s", capsize=3, color="tab:blue")
        for k, w in enumerate(doc["whitebox"], start=len(rows) - len(doc["whitebox"])):
            if w["whitebox_accuracy"] is not None:
                ax.plot([w["whitebox_accuracy"]], [k], "x", color="tab:red", ms=7,
                        label="white-box run" if k == len(rows) - len(doc["whitebox"]) else None)
        ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
        ax.set_xlim(-0.03, 1.03)
        ax.invert_yaxis()
        ax.set_xlabel(f"share ({doc['config']['ci_level']:.0%} CI)")
        ax.plot([], [], "s", color="tab:blue", label="measured (CI)")
        if doc["whitebox"]:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
        ax.set_title(f"{doc['model']} at {doc['base_url']}", fontsize=8)
        fig.tight_layout()
        save_figure(fig, path)
        plt.close(fig)
