"""The benchmark's files: ``table.csv``, ``table.tex``, ``timings.json``, ``roc.png``,
``faithfulness_curves.png`` and, last (completion marker), ``benchmark.md``, each written atomically
to exactly the path the caller names (the rule's outputs; `benchmark_outputs(folder)` gives the
default names in one folder). Every number comes from the ``timings.json`` document.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from mechflow.benchmark.evaluation import ranking_inputs
from mechflow.benchmark.restriction import EdgeRestriction
from mechflow.benchmark.roc import roc_curve
from mechflow.contracts.benchmark import TimingsDocument
from mechflow.contracts.documents import write_document
from mechflow.io import atomic_write_text, outputs_in
from mechflow.plotting import save_figure

TABLE_CSV, TABLE_TEX, TIMINGS_JSON = "table.csv", "table.tex", "timings.json"
ROC_PNG, CURVES_PNG, BENCHMARK_MD = "roc.png", "faithfulness_curves.png", "benchmark.md"
COLUMNS = ("method", "seconds", "n_forward", "n_backward", "n_edges_in_circuit", "faithfulness", "cpr",
           "cmd", "roc_auc")
TIMING_COLUMNS = ("seconds",)
# Output name (the rule's `output:` name, the stage function's keyword) -> default file name.
BENCHMARK_OUTPUTS = {"table": TABLE_CSV, "table_tex": TABLE_TEX, "timings": TIMINGS_JSON, "summary": BENCHMARK_MD,
                     "roc": ROC_PNG, "curves": CURVES_PNG}


def benchmark_outputs(folder: str | Path) -> dict[str, Path]:
    """The stage's (and `compare_methods`') output paths with their default file names in `folder`
    (library and test callers: ``benchmark(cfg, ..., **benchmark_outputs(folder))``)."""
    return outputs_in(folder, BENCHMARK_OUTPUTS)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_outputs(out: Mapping[str, Path], doc: dict, rows: list[dict], curves: dict, scores: dict,
                   positives: Tensor, restriction: EdgeRestriction, acdc_roc: list[dict], aucs: dict) -> None:
    """Write the `BENCHMARK_OUTPUTS` files to the paths in `out` (output name -> path), each atomically;
    the summary last (completion marker)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([_fmt(r[c]) for c in COLUMNS])
    atomic_write_text(out["table"], buf.getvalue())
    atomic_write_text(out["table_tex"], _latex(rows))
    write_document(out["timings"], TimingsDocument, doc)
    _plots(out, curves, scores, positives, restriction, acdc_roc, aucs)
    atomic_write_text(out["summary"], _markdown(doc, rows))


def _latex(rows: list[dict]) -> str:
    head = ["method", "s", "fwd", "bwd", "edges", "$f$", "CPR", "CMD", "AUC"]
    lines = [r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}", r"\toprule", " & ".join(head) + r" \\",
             r"\midrule"]
    for r in rows:
        cells = [r["method"].replace("_", r"\_")] + [_fmt(r[c]) or "--" for c in COLUMNS[1:]]
        lines.append(" & ".join(cells) + r" \\")
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}", ""])


def _plots(out: Mapping[str, Path], curves: dict, scores: dict, positives: Tensor, restriction: EdgeRestriction,
           acdc_roc: list[dict], aucs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for name in ("eap", "eap-ig", "exhaustive"):
        fpr, tpr = roc_curve(*ranking_inputs(scores[name], positives, restriction))
        ax.plot([*fpr, 1.0], [*tpr, 1.0], label=f"{name} (AUC {_fmt(aucs[name])})")
    pts = sorted({(0.0, 0.0), (1.0, 1.0), *((p["fpr"], p["tpr"]) for p in acdc_roc)})
    ax.plot(*zip(*pts), marker="o", label=f"acdc tau sweep (AUC {_fmt(aucs['acdc'])})")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="edge ROC vs exhaustive patching")
    ax.legend(fontsize=7)
    _savefig(fig, out["roc"])
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, c in curves.items():
        ax.plot([p.percent for p in c], [p.faithfulness for p in c], marker=".", label=name)
    ax.set(xscale="log", xlabel="% of restricted edges kept", ylabel="restricted faithfulness f",
           title="faithfulness at MIB budgets")
    ax.legend(fontsize=7)
    _savefig(fig, out["curves"])
    plt.close("all")


def _savefig(fig, path: Path) -> None:
    save_figure(fig, path, dpi=120, bbox_inches="tight")


def _markdown(doc: dict, rows: list[dict]) -> str:
    h, x = doc["headline"], doc["full_graph_extrapolation"]
    lines = [
        "# Circuit discovery benchmark", "",
        (f"Restriction {doc['restriction']}: {doc['n_edges_restricted']} of {doc['n_edges_full']} edges "
         f"(edges outside it always kept; budgets are % of the restricted edges); {doc['n_prompts']} prompts "
         f"of {doc['n_pos']} tokens; torch threads {doc['machine']['torch_threads']}. Source: `{TIMINGS_JSON}`."), "",
        f"Per-method table: `{TABLE_CSV}` (LaTeX: `{TABLE_TEX}`); curves: `{CURVES_PNG}`; ROC: `{ROC_PNG}`.", "",
        "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows), "",
        f"## Headline (`{TIMINGS_JSON}` -> headline)", "",
        (f"ACDC tau matched to ours by {h['acdc_match']}: tau={h['acdc_tau']:g}, "
         f"f={h['acdc_faithfulness']:.4g} (ours f={h['ours_faithfulness']:.4g})."), "",
        f"ACDC time / our discovery time = {h['arithmetic']}.", "",
        (f"Whole ACDC sweep / ours = {h['acdc_sweep_ratio']:.3f}. CPR: ACDC {h['acdc_cpr']:.4g}, "
         f"ours (EAP-IG ranking) {h['ours_cpr']:.4g}."), "",
        f"## Full-graph extrapolation (`{TIMINGS_JSON}` -> full_graph_extrapolation)", "",
        f"ACDC estimate (not measured): {x['arithmetic']}. {x['caveat']}", "",
        (f"Ours on the full graph (measured in this run: EAP-IG over every edge + exact bisection): "
         f"{x['ours_full_graph']['seconds']:.1f} s"
         + (f", {x['ours_full_graph']['n_edges']} edges, f={x['ours_full_graph']['faithfulness']:.4g}"
            if "n_edges" in x["ours_full_graph"] else "")
         + f". Full-graph ratio: {x['full_graph_ratio_arithmetic']}."), "",
        (f"Depth-weighted ACDC estimate (per-candidate cost measured at {len(x['stage_costs']['stages'])} "
         f"start stages, linear fit): {x['depth_weighted_arithmetic']}; full-graph ratio "
         f"{x['full_graph_ratio_depth_weighted']:.1f}."), "",
        f"## Every method on the full graph (`{TIMINGS_JSON}` -> full_graph)", "",
        "| method | seconds | measured | / ours | arithmetic |", "|---|---|---|---|---|",
        *(f"| {r['method']} | {r['seconds']:.1f} | {'yes' if r['measured'] else 'no (extrapolated)'} | "
          f"{r['ratio_to_ours']:.2f} | {r['arithmetic']} |" for r in doc["full_graph"]), "",
    ]
    return "\n".join(lines)

