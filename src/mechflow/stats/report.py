"""Human-facing outputs of the statistics stage: markdown summaries, headline numbers, figures.

Every number in a markdown summary is read from a table or JSON that the stage writes, and the
file is named next to it; numbers are printed with 4 significant digits (`_fmt`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mechflow.plotting import save_figure
from mechflow.stats.cka import DepthCKA
from mechflow.stats.output import matrix_heatmap

logger = logging.getLogger(__name__)

CIRCUIT_PLOTTED = ("faithfulness", "sufficiency", "comprehensiveness", "f1", "cpr", "cmd")
METHOD_COLORS = {"exact": "tab:blue", "ap": "tab:orange", "ig": "tab:green"}
MAX_MD_COMPONENTS = 10


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{float(x):.4g}"


def _row(table: pl.DataFrame, quantity: str) -> dict[str, Any] | None:
    sub = table.filter(pl.col("quantity") == quantity)
    return sub.row(0, named=True) if sub.height else None


def ranking_method(methods: Sequence[str]) -> str:
    """The method whose |mean score| picks the components shown: exact if present."""
    return "exact" if "exact" in methods else methods[0]


def top_components(table: pl.DataFrame, methods: Sequence[str], k: int) -> list[str]:
    """The k components with the largest |mean score| of `ranking_method` (ties: table order)."""
    m = ranking_method(methods)
    sub = table.filter((pl.col("group") == "score") & (pl.col("method") == m))
    order = np.argsort(-np.abs(sub["estimate"].to_numpy()), kind="stable")[:k]
    return [sub["component"][int(i)] for i in order]


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    save_figure(fig, path, dpi=150, bbox_inches="tight")
    return path


def _interval_points(ax, y: np.ndarray, est: np.ndarray, lo: np.ndarray, hi: np.ndarray, color: str,
                     label: str) -> None:
    ok = np.isfinite(lo) & np.isfinite(hi)
    ax.errorbar(est[ok], y[ok], xerr=[est[ok] - lo[ok], hi[ok] - est[ok]], fmt="o", ms=3, capsize=2,
                color=color, label=label)
    if (~ok).any():
        ax.plot(est[~ok], y[~ok], "x", color=color)


def forest_figure(table: pl.DataFrame, scores: Any, k: int, interval: str, path: Path, *, model: str = "") -> Path:
    """CIs of the top-k components (by |mean exact score|) for every method, plus the circuit quantities.

    Args:
        table: the bootstrap table (`stage.bootstrap_table`).
        scores: the `NodeScores` (for the method list).
        k: number of components shown.
        interval: "bca" or "percentile" (columns `{interval}_lo/hi`).
        path: output PNG.
    """
    methods = list(scores.methods)
    comps = top_components(table, methods, k)
    circ = [q for q in CIRCUIT_PLOTTED if _row(table, f"circuit:{q}") is not None]
    ncols = 2 if circ else 1
    fig = Figure(figsize=(6 * ncols, 0.28 * len(comps) * len(methods) / 2 + 2.0))
    ax = fig.add_subplot(1, ncols, 1)
    y0 = np.arange(len(comps))[::-1].astype(float)
    width = 0.7 / max(1, len(methods))
    for j, m in enumerate(methods):
        rows = [_row(table, f"score:{m}:{c}") for c in comps]
        est = np.array([r["estimate"] for r in rows], dtype=float)
        lo = np.array([np.nan if r[f"{interval}_lo"] is None else r[f"{interval}_lo"] for r in rows], dtype=float)
        hi = np.array([np.nan if r[f"{interval}_hi"] is None else r[f"{interval}_hi"] for r in rows], dtype=float)
        _interval_points(ax, y0 + 0.35 - (j + 0.5) * width, est, lo, hi, METHOD_COLORS.get(m, f"C{j + 3}"), m)
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(y0, comps, fontsize=7)
    ax.set_xlabel("mean score (metric(patched) - metric(clean))")
    ax.set_title(f"{model}: top {len(comps)} by |mean {ranking_method(methods)} score|, {interval} CI", fontsize=9)
    ax.legend(fontsize=7)
    if circ:
        ax2 = fig.add_subplot(1, ncols, 2)
        rows = [_row(table, f"circuit:{q}") for q in circ]
        est = np.array([r["estimate"] for r in rows], dtype=float)
        lo = np.array([np.nan if r[f"{interval}_lo"] is None else r[f"{interval}_lo"] for r in rows], dtype=float)
        hi = np.array([np.nan if r[f"{interval}_hi"] is None else r[f"{interval}_hi"] for r in rows], dtype=float)
        y = np.arange(len(circ))[::-1].astype(float)
        _interval_points(ax2, y, est, lo, hi, "tab:purple", "circuit")
        ax2.axvline(0.0, color="grey", lw=0.8, ls="--")
        ax2.axvline(1.0, color="grey", lw=0.8, ls=":")
        ax2.set_yticks(y, circ, fontsize=8)
        ax2.set_title(f"circuit quantities, {interval} CI", fontsize=9)
    return _save(fig, Path(path))


def tau_heatmap(stab: Mapping[str, Any], path: Path) -> Path:
    """Method x method Kendall tau-b of the |mean score| rankings (a 1x1 map with one method)."""
    mp = stab["methods_pairwise"]
    if "abs" in mp:
        names, tau = mp["abs"]["names"], np.array(mp["abs"]["tau_b"], dtype=float)
        title = f"Kendall tau-b of |mean score| rankings ({stab['n_components']} components)"
    else:
        names, tau = list(stab["methods"]), np.ones((1, 1))
        title = mp["skipped"]
    return matrix_heatmap(names, names, tau, Path(path), title=title)


def _ci(row: Mapping[str, Any] | None, interval: str) -> dict[str, Any] | None:
    if row is None:
        return None
    return {"estimate": row["estimate"], "lo": row[f"{interval}_lo"], "hi": row[f"{interval}_hi"], "se": row["se"]}


def headline_numbers(table: pl.DataFrame, stab: Mapping[str, Any], interval: str) -> dict[str, Any]:
    """JSON-ready headline numbers of `stats` (all taken from the written files)."""
    first = table.row(0, named=True)
    out: dict[str, Any] = {"n_prompts": first["n_prompts"], "B": first["B"], "seed": first["seed"],
                           "ci_level": first["ci_level"], "interval": interval, "methods": stab["methods"],
                           "n_components": stab["n_components"], "k": stab["k"]}
    out["task"] = {q: _ci(_row(table, f"task:{q}"), interval) for q in ("clean_metric", "corrupted_metric")}
    circ = table.filter(pl.col("group") == "circuit")
    out["circuit"] = {n.split(":", 1)[1]: _ci(_row(table, n), interval) for n in circ["quantity"].to_list()}
    out["circuit_n_prompts"] = int(circ["n_prompts"][0]) if circ.height else None
    mp = stab["methods_pairwise"]
    out["tau_methods"] = {r: {f"{mp[r]['names'][i]}~{mp[r]['names'][j]}": mp[r]["tau_b"][i][j]
                              for i in range(len(mp[r]["names"])) for j in range(i + 1, len(mp[r]["names"]))}
                          for r in ("signed", "abs") if r in mp}
    out["top_components"] = top_components(table, stab["methods"], stab["k"])
    return out


def _summary_cells(summary: Mapping[str, Any]) -> str:
    qs = [k for k in summary if k.startswith("q")]
    return "mean " + _fmt(summary.get("mean")) + "; " + ", ".join(f"{k} {_fmt(summary[k])}" for k in qs)


def statistics_markdown(model: str, table: pl.DataFrame, stab: Mapping[str, Any], head: Mapping[str, Any],
                        interval: str) -> str:
    """`statistics.md`: task and circuit CIs, top components, ranking stability, each with its file."""
    lvl = f"{head['ci_level']:.0%}"
    L = [f"# Statistics: {model}", "",
         f"{head['n_prompts']} prompts, B = {head['B']} bootstrap resamples (seed {head['seed']}), {lvl} "
         f"{interval} intervals; one resample draw serves every quantity (`bootstrap.csv`). Numbers are shown "
         "with 4 significant digits.", ""]
    L += ["## Task metric (`bootstrap.csv`)", "", "| quantity | estimate | SE | CI low | CI high |",
          "|---|---|---|---|---|"]
    for q, v in head["task"].items():
        L.append(f"| task:{q} | {_fmt(v['estimate'])} | {_fmt(v['se'])} | {_fmt(v['lo'])} | {_fmt(v['hi'])} |")
    L.append("")
    if head["circuit"]:
        circ = table.filter(pl.col("group") == "circuit")
        checked = "; point estimates equal `circuit.json`" if circ["reference"].null_count() == 0 else ""
        kind = "Node" if head.get("circuit_unit") == "nodes" else "Edge"
        L += [f"## {kind} circuit (`bootstrap.csv`{checked})", ""]
        if circ["resample_set"][0] != "prompts":
            L += [f"The circuit stage evaluated its own batch of {circ['n_prompts'][0]} prompts, not the "
                  f"{head['n_prompts']} node-score prompts: these intervals resample that batch "
                  "(`resample_set` = circuit_prompts).", ""]
        L += ["| quantity | estimate | SE | CI low | CI high |", "|---|---|---|---|---|"]
        for q, v in head["circuit"].items():
            L.append(f"| circuit:{q} | {_fmt(v['estimate'])} | {_fmt(v['se'])} | {_fmt(v['lo'])} | {_fmt(v['hi'])} |")
        L.append("")
    else:
        L += ["No circuit files were given: no circuit quantities.", ""]
    comps = head["top_components"][:MAX_MD_COMPONENTS]
    methods = list(head["methods"])
    L += [f"## Top {len(comps)} components by |mean {ranking_method(methods)} score| (`bootstrap.csv`)", "",
          "| component | " + " | ".join(f"{m} mean [{interval} CI]" for m in methods) + " |",
          "|---|" + "---|" * len(methods)]
    for c in comps:
        cells = []
        for m in methods:
            r = _row(table, f"score:{m}:{c}")
            cells.append(f"{_fmt(r['estimate'])} [{_fmt(r[f'{interval}_lo'])}, {_fmt(r[f'{interval}_hi'])}]")
        L.append(f"| {c} | " + " | ".join(cells) + " |")
    L.append("")
    L += [f"## Ranking stability (k = {stab['k']}; `stability.json`)", ""]
    mp = stab["methods_pairwise"]
    if "skipped" in mp:
        L += [f"Between methods: skipped ({mp['skipped']}).", ""]
    else:
        L += ["Between methods (`stability_methods.csv`):", "", "| ranking | a | b | Kendall tau-b | top-k Jaccard |",
              "|---|---|---|---|---|"]
        for r in ("signed", "abs"):
            names = mp[r]["names"]
            for i in range(len(names)):
                for j in range(i + 1, len(names)):
                    L.append(f"| {r} | {names[i]} | {names[j]} | {_fmt(mp[r]['tau_b'][i][j])} | "
                             f"{_fmt(mp[r]['jaccard_top_k'][i][j])} |")
        L.append("")
    L += ["Over bootstrap resamples (tau-b / Jaccard of each resample's ranking with the full-sample one):", ""]
    for m, d in stab["bootstrap"].items():
        for r in ("signed", "abs"):
            L.append(f"- {m}, {r}: tau {_summary_cells(d[r]['tau_summary'])}; "
                     f"Jaccard {_summary_cells(d[r]['jaccard_summary'])}")
    L.append("")
    tp = stab["templates"]
    if "skipped" in tp:
        L += [f"Across templates: skipped ({tp['skipped']}).", ""]
    else:
        L += [f"Across {len(tp['templates'])} templates (pairwise tau-b between per-template rankings):", ""]
        for m, d in tp["by_method"].items():
            for r in ("signed", "abs"):
                L.append(f"- {m}, {r}: tau {_summary_cells(d[r]['tau_summary'])}; "
                         f"Jaccard {_summary_cells(d[r]['jaccard_summary'])}")
        L.append("")
    return "\n".join(L)


def cka_headline(res: DepthCKA, prompts: Any, model_a: str, model_b: str) -> dict[str, Any]:
    """`cka.json`: the prompt counts and, per layer of A, the depth-matched and best-matching layer of B,
    with the plug-in and the debiased CKA and (when computed) the row-shuffled baseline of both."""
    nearest = res.depth_matched_b
    best = np.argmax(res.matrix, axis=1)
    deb = res.debiased if res.debiased is not None else np.full_like(res.matrix, np.nan)
    rows = [{"layer_a": int(la), "depth_a": float(res.depth_a[i]),
             "depth_matched_layer_b": int(res.layers_b[nearest[i]]),
             "depth_matched_cka": float(res.matrix[i, nearest[i]]),
             "depth_matched_cka_debiased": float(deb[i, nearest[i]]),
             "best_layer_b": int(res.layers_b[best[i]]), "best_cka": float(res.matrix[i, best[i]])}
            for i, la in enumerate(res.layers_a)]
    if res.shuffled is not None:
        for row, base in zip(rows, res.shuffled):
            row.update(shuffled_cka=base["linear"], shuffled_cka_debiased=base["debiased"])
    out = {"model_a": model_a, "model_b": model_b, "hook": "blocks.{l}.hook_resid_post",
           "position": "last prompt token",
           "n_prompts": len(prompts.texts), "n_prompts_a": prompts.n_a, "n_prompts_b": prompts.n_b,
           "n_shared": prompts.n_shared,
           "prompts": "union of both task datasets' prompt texts, each model with its own tokenization",
           "estimators": "cka: plug-in linear CKA (Kornblith et al. 2019), biased upward when n_prompts < d_model; "
                         "cka_debiased: unbiased HSIC (Song et al. 2012; Nguyen et al. 2021), ~0 for unrelated "
                         "representations; shuffled_*: mean over row permutations of B (no token correspondence)",
           "mean_depth_matched_cka": float(np.mean([r["depth_matched_cka"] for r in rows])),
           "mean_depth_matched_cka_debiased": float(np.nanmean([r["depth_matched_cka_debiased"] for r in rows])),
           "by_layer_a": rows}
    if res.shuffled is not None:
        out["mean_shuffled_cka"] = float(np.mean([r["shuffled_cka"] for r in rows]))
        out["mean_shuffled_cka_debiased"] = float(np.nanmean([r["shuffled_cka_debiased"] for r in rows]))
        out["n_shuffles"] = int(res.shuffled[0]["n_shuffles"])
    return out


def cross_model_markdown(fcas: Mapping[str, Any], cka: Mapping[str, Any] | None) -> str:
    """`cross_model.md`: FCAS with its null, matched pairs, and the CKA summary."""
    a, b = fcas["model_a"], fcas["model_b"]
    L = [f"# Cross-model alignment: {a} vs {b}", "",
         "## FCAS (`fcas.json`, null histogram `fcas_null.png`)", "",
         f"FCAS = {_fmt(fcas['score'])} at k = {fcas['k']} (labels: {fcas['labels']}); "
         f"null `{fcas['null_kind']}` with {fcas['n_permutations']} draws: mean {_fmt(fcas['null_mean'])}, "
         f"sd {_fmt(fcas['null_std'])}; p = {_fmt(fcas['p_value'])} (randomized {_fmt(fcas['p_value_randomized'])}), "
         f"z = {_fmt(fcas['z'])}.", "",
         "| A component | depth | label | score | B component | depth | label | score | similarity |",
         "|---|---|---|---|---|---|---|---|---|"]
    for p in fcas["pairs"]:
        pa, pb = p["a"], p["b"]
        L.append(f"| {pa['component']} | {_fmt(pa['depth'])} | {pa['label']} | {_fmt(pa['score'])} | {pb['component']} "
                 f"| {_fmt(pb['depth'])} | {pb['label']} | {_fmt(pb['score'])} | {_fmt(p['similarity'])} |")
    L.append("")
    if cka is None:
        L += ["No representation similarity (activations off or model configs not given).", ""]
        return "\n".join(L)
    L += ["## Linear CKA by relative depth (`cka.json`, matrix `cka.parquet`, `cka.png`)", "",
          f"{cka['n_prompts']} prompt texts, read by both models: the union of {a}'s {cka['n_prompts_a']} and "
          f"{b}'s {cka['n_prompts_b']} task prompts ({cka['n_shared']} shared); residual stream after each "
          "block at the last prompt token. "
          f"Mean CKA between depth-matched layers: plug-in {_fmt(cka['mean_depth_matched_cka'])}, debiased "
          f"{_fmt(cka.get('mean_depth_matched_cka_debiased'))}"
          + (f"; with B's rows shuffled ({cka['n_shuffles']} permutations, no token correspondence): plug-in "
             f"{_fmt(cka['mean_shuffled_cka'])}, debiased {_fmt(cka['mean_shuffled_cka_debiased'])}"
             if "mean_shuffled_cka" in cka else "")
          + ". The plug-in estimate is biased upward when prompts are fewer than dimensions; read the debiased one "
          "against its shuffled level.", "",
          f"| {a} layer | depth | depth-matched {b} layer | CKA | debiased | shuffled debiased "
          f"| best {b} layer | CKA |",
          "|---|---|---|---|---|---|---|---|"]
    for r in cka["by_layer_a"]:
        L.append(f"| {r['layer_a']} | {_fmt(r['depth_a'])} | {r['depth_matched_layer_b']} "
                 f"| {_fmt(r['depth_matched_cka'])} "
                 f"| {_fmt(r.get('depth_matched_cka_debiased'))} | {_fmt(r.get('shuffled_cka_debiased'))} "
                 f"| {r['best_layer_b']} | {_fmt(r['best_cka'])} |")
    L.append("")
    return "\n".join(L)
