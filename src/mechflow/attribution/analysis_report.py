"""``analysis.md`` of rule ``analyze``: every number read back from the Parquet files written (and the
task's ``causal_tracing.parquet`` when it has one), each through its contract."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from mechflow.attribution.causal_trace import role_means
from mechflow.attribution.neuron_contexts import md_escape
from mechflow.attribution.stage_io import read_table
from mechflow.contracts.parquet import ABLATIONS_SCHEMA, CAUSAL_TRACING_SCHEMA, NEURONS_SCHEMA, SALIENCY_SCHEMA


def analysis_markdown(title: str, *, ablations: Path, saliency: Path, neurons: Path,
                      causal_tracing: Path | None = None) -> str:
    """analysis.md: every number read from the written Parquet files."""
    abl = read_table(ablations, ABLATIONS_SCHEMA, "analyze")
    sal = read_table(saliency, SALIENCY_SCHEMA, "analyze")
    neur = read_table(neurons, NEURONS_SCHEMA, "analyze")
    ig = sal.filter(pl.col("method") == "integrated_gradients")
    per = ig.unique("prompt").sort("prompt")
    n = per.height
    lines = [f"# Analysis: {title}", "",
             f"{n} prompt pairs (first of the largest equal-length bucket). Files in this folder: `ablations.parquet`, "
             "`saliency.parquet`, `neurons.parquet` (+ `neurons.md`)"
             + (", `causal_tracing.parquet`" if causal_tracing else "") + ".", ""]

    lines += ["## Ablations", "", ("Mean over prompts of m(ablated) − m(clean), per head (`hook_z`) and MLP "
              "(`hook_mlp_out`); `ablations.png`."), ""]
    if abl.height:
        means = abl.group_by("method", "component").agg(pl.col("score").mean())
        lines += ["| method | replacement | mean abs(Δ) over components | largest-abs(Δ) components |",
                  "|---|---|---|---|"]
        for method in dict.fromkeys(abl["method"].to_list()):
            m = means.filter(pl.col("method") == method).with_columns(pl.col("score").abs().alias("a"))
            top = m.sort("a", descending=True).head(5)
            ref = abl.filter(pl.col("method") == method)["reference"][0]
            lines.append(f"| {method} | {ref} | {m['a'].mean():.4f} | "
                         + ", ".join(f"{r['component']} {r['score']:+.4f}" for r in top.iter_rows(named=True)) + " |")
    else:
        lines.append("No ablation methods configured.")
    lines.append("")

    lines += ["## Token saliency", "",
              (f"Integrated gradients ({per['ig_steps'][0]} steps, {per['ig_baseline'][0]} baseline) on the input "
               "embeddings; completeness residual = Σ IG − (m − m_baseline)."), "",
              f"- mean m(clean) {per['metric'].mean():.4f}, mean m(baseline) {per['baseline_metric'].mean():.4f}",
              f"- max |completeness residual| {per['ig_completeness_residual'].abs().max():.3g} "
              f"(tolerance up to {per['ig_tolerance'].max():.3g}); prompts outside the tolerance: "
              f"{int((~per['ig_complete']).sum())} of {n}"
              + (" — **IG is incomplete for these prompts: raise ig_steps**" if not per["ig_complete"].all() else ""),
              ""]
    top_tok = (ig.with_columns(pl.col("score").abs().alias("a")).sort("a", descending=True)
               .unique("prompt", keep="first", maintain_order=True).sort("prompt").head(8))
    lines += ["| prompt | largest-abs(IG) token | position | IG |", "|---|---|---|---|"]
    for r in top_tok.iter_rows(named=True):
        tok = md_escape(r["token"]) if r["token"] is not None else str(r["token_id"])
        lines.append(f"| {r['prompt']} | {tok} | {r['position']} | {r['score']:+.4f} |")
    lines.append("")

    sources = ", ".join(f"`{x}`" for x in neur["context_source"].unique().sort())
    lines += ["## Neurons", "", f"Top MLP neurons (contexts from {sources}; see `neurons.md`).", "",
              "| by | neuron | score | top context (activation) |", "|---|---|---|---|"]
    first = neur.filter(pl.col("context_rank") == 0).filter(pl.col("rank") < 5)
    for r in first.iter_rows(named=True):
        ctx = md_escape(r["context"]) if r["context"] is not None else str(r["context_token_ids"])
        lines.append(f"| {r['method']} | L{r['layer']}N{r['neuron']} | {r['score']:+.4g} | "
                     f"{ctx} ({r['activation']:.3g}) |")
    lines.append("")

    if causal_tracing is not None:
        ct = read_table(causal_tracing, CAUSAL_TRACING_SCHEMA, "causal_trace")
        pp = ct.unique("prompt").sort("prompt")
        means = role_means(ct)
        lines += ["## Causal tracing", "",
                  (f"Subject embeddings noised (σ = {ct['sigma'][0]:.4g}, noise samples: {ct['n_samples'][0]}); "
                   f"metric {ct['metric'][0]}: clean {pp['m_clean'].mean():.4f}, corrupted "
                   f"{pp['m_corrupted'].mean():.4f}, all clean states restored at layer 0: "
                   f"{pp['m_restore_all'].mean():.4f} (max |restored − clean| "
                   f"{(pp['m_restore_all'] - pp['m_clean']).abs().max():.2g})."), "",
                  "| restored | peak mean indirect effect | at (token role, layer) | last subject token peak |",
                  "|---|---|---|---|"]
        for kind in dict.fromkeys(ct["kind"].to_list()):
            m = means.filter(pl.col("kind") == kind).sort("score", descending=True)
            best = m.row(0, named=True)
            subj = m.filter(pl.col("role") == "last subject")
            s = subj.row(0, named=True) if subj.height else None
            lines.append(f"| {kind} | {best['score']:+.4f} | {best['role']}, layer {best['layer']} | "
                         + (f"{s['score']:+.4f} (layer {s['layer']})" if s else "—") + " |")
        lines.append("")
    return "\n".join(lines)
