"""`snakemake figures`: a run's paper figures (PDF + PNG, one style) and tables (CSV + LaTeX).

Stage function of rule `paper_figures` (one job per run; the target rule `figures` asks for every
run's). It builds the report's document (`mechflow.report.stage.build_report`: every number read
from a file the run manifest records, hashed and checked) and draws only from those numbers, so a
figure shows exactly what the report states and each table row names its evidence. The report
embeds these figures; the README's figures come from here too.

Figures (`FIGURES`): task accuracy with chance; circuit faithfulness with bootstrap CIs; attribution
methods' ROC AUC against exact patching; dictionary metrics; attribution-graph scores; the run's
rule graph (Snakemake's ``--rulegraph``, drawn here because Graphviz is not a Python dependency). A run without
the data of one (no graphs, no reference tasks) gets a figure that says so, naming the setting.
Tables (`TABLES`): the report's table blocks of the same names, plus the evidence list.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mechflow.contracts.report import ProviderFile, ReportDocument
from mechflow.io import atomic_write_text
from mechflow.plotting import PALETTE, save_figure, style
from mechflow.report.config import ReportConfig
from mechflow.report.render import TOKEN, resolve

log = logging.getLogger(__name__)

FIGURES = ("tasks", "circuits", "reference", "dictionaries", "graphs", "dag")
TABLES = ("tasks", "circuits", "reference", "statistics", "cross_model", "benchmark", "dictionaries", "graphs",
          "steering", "limitations", "evidence")


def _value(doc_numbers: dict, id: str) -> Any:
    n = doc_numbers.get(id)
    return None if n is None else n.value


def _empty(ax, message: str) -> None:
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=9, wrap=True, transform=ax.transAxes)


def _threshold(ax, x: float, label: str, vertical: bool = True) -> None:
    (ax.axvline if vertical else ax.axhline)(x, color="0.3", ls="--", lw=0.9, label=label)


def figure_tasks(doc: ReportDocument, numbers: dict, cfg: ReportConfig):
    import matplotlib.pyplot as plt

    tasks = sorted({m.group(1) for i in numbers if (m := re.fullmatch(r"tasks\.([^.]+)\.accuracy", i))})
    fig, ax = plt.subplots(figsize=(5.9, 1.0 + 0.42 * max(1, len(tasks))), layout="constrained")
    if not tasks:
        _empty(ax, "No task baselines in this run.")
        return fig
    y = np.arange(len(tasks))[::-1]
    acc = [_value(numbers, f"tasks.{t}.accuracy") for t in tasks]
    chance = [_value(numbers, f"tasks.{t}.chance_accuracy") for t in tasks]
    ax.barh(y, [a or 0 for a in acc], color=PALETTE[0], height=0.6, label="accuracy")
    ax.scatter([c if c is not None else np.nan for c in chance], y, marker="|", s=300, color=PALETTE[3], zorder=3,
               label="chance")
    for yi, t, a in zip(y, tasks, acc):
        verdict = str(_value(numbers, f"tasks.{t}.verdict")).split(":")[0].split(" (")[0]
        ax.text(1.02, yi, f"{'n/a' if a is None else round(a, 3)}  {verdict}", va="center", fontsize=7.5,
                transform=ax.get_yaxis_transform())
    ax.set_yticks(y, tasks)
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy (share of prompts with a positive task metric)")
    ax.set_title(f"{doc.model}: task baselines")
    fig.legend(loc="outside lower center", ncol=2, frameon=False)
    return fig


def figure_circuits(doc: ReportDocument, numbers: dict, cfg: ReportConfig):
    import matplotlib.pyplot as plt

    tasks = sorted({m.group(1) for i in numbers if (m := re.fullmatch(r"circuits\.([^.]+)\.faithfulness", i))})
    fig, ax = plt.subplots(figsize=(5.9, 1.1 + 0.42 * max(1, len(tasks))), layout="constrained")
    if not tasks:
        _empty(ax, "No circuits in this run.")
        return fig
    y = np.arange(len(tasks))[::-1]
    for yi, t in zip(y, tasks):
        f = _value(numbers, f"circuits.{t}.faithfulness")
        lo, hi = (_value(numbers, f"circuits.{t}.faithfulness_ci.{k}") for k in ("lo", "hi"))
        if lo is not None and hi is not None:
            ax.errorbar([f], [yi], xerr=[[f - lo], [hi - f]], fmt="o", color=PALETTE[0], capsize=3)
        else:
            ax.plot([f], [yi], "o", color=PALETTE[0])
        size, total = _value(numbers, f"circuits.{t}.n_units"), _value(numbers, f"circuits.{t}.n_units_total")
        ax.text(1.02, yi, f"{size} / {total}", va="center", fontsize=7.5, transform=ax.get_yaxis_transform())
    _threshold(ax, cfg.faithfulness_min, f"report.faithfulness_min = {cfg.faithfulness_min}")
    ax.set_yticks(y, tasks)
    ax.set_xlabel(f"faithfulness (exact patching), {cfg.ci_method} bootstrap CI over prompts")
    ax.set_title(f"{doc.model}: circuits (size / units in the model at right)")
    fig.legend(loc="outside lower center", frameon=False)
    return fig


def figure_reference(doc: ReportDocument, numbers: dict, cfg: ReportConfig):
    import matplotlib.pyplot as plt

    rows: dict[str, dict[str, float]] = {}
    for i, n in numbers.items():
        parts = i.split(".")
        if parts[0] == "reference" and n.value is not None:
            task, level, method, variant = parts[1], parts[2], parts[-2], parts[-1]
            where = f"{task} · {level}" + (f" ({parts[3]})" if level == "edges" else "") + f" · {variant}"
            rows.setdefault(where, {})[method] = float(n.value)
    fig, ax = plt.subplots(figsize=(5.9, 1.2 + 0.3 * max(1, len(rows))), layout="constrained")
    if not rows:
        _empty(ax, "No reference comparison in this run (reference.tasks).")
        return fig
    labels = sorted(rows)
    y = np.arange(len(labels))[::-1]
    methods = sorted({m for r in rows.values() for m in r})
    for k, method in enumerate(methods):
        xs = [rows[label].get(method, np.nan) for label in labels]
        ax.scatter(xs, y + (k - (len(methods) - 1) / 2) * 0.12, color=PALETTE[k % len(PALETTE)], label=method, s=16,
                   zorder=3)
    _threshold(ax, cfg.reference_auc_min, f"report.reference_auc_min = {cfg.reference_auc_min}")
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("ROC AUC of |attribution score| against exact patching (task · level · positives)")
    ax.set_title(f"{doc.model}: attribution methods vs exact patching")
    fig.legend(loc="outside lower center", ncol=len(methods) + 1, frameon=False)
    return fig


def figure_dictionaries(doc: ReportDocument, numbers: dict, cfg: ReportConfig):
    import matplotlib.pyplot as plt

    names = [n for n in ("sae", "transcoder", "set") if f"dictionaries.{n}.fvu" in numbers]
    panels = (("fvu", "FVU (held out)", cfg.fvu_max, "fvu_max"), ("l0", "mean L0", cfg.l0_max, "l0_max"),
              ("dead_fraction", "dead fraction", cfg.dead_fraction_max, "dead_fraction_max"),
              ("ce_recovered_mean", "CE recovered (vs mean abl.)", cfg.ce_recovered_min, "ce_recovered_min"))
    fig, axes = plt.subplots(1, 4, figsize=(7.2, 2.2))
    if not names:
        for ax in axes:
            ax.axis("off")
        _empty(axes[1], "No dictionaries in this run.")
        return fig
    labels = {"sae": "SAE", "transcoder": "transcoder", "set": "set (mean)"}
    for ax, (key, title, threshold, _) in zip(axes, panels):
        vals = [_value(numbers, f"dictionaries.{n}.{key}") for n in names]
        x = np.arange(len(names))
        ax.bar(x, [np.nan if v is None else v for v in vals], color=[PALETTE[i] for i in range(len(names))], width=0.6)
        ax.axhline(threshold, color="0.3", ls="--", lw=0.9)
        ax.set_xticks(x, [labels[n] for n in names], rotation=30, ha="right")
        ax.set_title(title, fontsize=8)
    fig.suptitle(f"{doc.model}: dictionaries (dashed: report.fvu_max, l0_max, dead_fraction_max, ce_recovered_min)",
                 fontsize=8.5)
    fig.tight_layout()
    return fig


def figure_graphs(doc: ReportDocument, numbers: dict, cfg: ReportConfig):
    import matplotlib.pyplot as plt

    graphs = sorted({m.group(1) for i in numbers if (m := re.fullmatch(r"graphs\.(.+)\.replacement", i))})
    fig, ax = plt.subplots(figsize=(5.9, 1.3 + 0.45 * max(1, len(graphs))), layout="constrained")
    if not graphs:
        _empty(ax, "No attribution graphs in this run (graph.enabled=false).")
        return fig
    y = np.arange(len(graphs))[::-1]
    rep = [_value(numbers, f"graphs.{g}.replacement") for g in graphs]
    comp = [_value(numbers, f"graphs.{g}.completeness") for g in graphs]
    ax.barh(y + 0.18, rep, height=0.34, color=PALETTE[0], label="replacement (pruned)")
    ax.barh(y - 0.18, comp, height=0.34, color=PALETTE[1], label="completeness (pruned)")
    ax.axvline(cfg.graph_replacement_min, color=PALETTE[0], ls="--", lw=0.9)
    ax.axvline(cfg.graph_completeness_min, color=PALETTE[1], ls="--", lw=0.9)
    ax.set_yticks(y, [g.replace(".p", " prompt ") for g in graphs])
    ax.set_xlim(0, 1)
    ax.set_xlabel("score (dashed: report.graph_replacement_min / graph_completeness_min)")
    ax.set_title(f"{doc.model}: attribution graphs")
    fig.legend(loc="outside lower center", ncol=2, frameon=False)
    return fig


DOT_NODE = re.compile(r'^\s*(\d+)\[label = "([^"]+)"', re.M)
DOT_EDGE = re.compile(r"^\s*(\d+) -> (\d+)", re.M)


def parse_rulegraph(dot: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Nodes (id -> rule name) and edges of ``snakemake --rulegraph``'s DOT output."""
    return dict(DOT_NODE.findall(dot)), DOT_EDGE.findall(dot)


def figure_dag(dot: str, title: str):
    """The rule graph, layered top (sources) to bottom (`all`); within a layer, rules sit near the mean
    position of their inputs (one barycentre pass, fewer crossings)."""
    import matplotlib.pyplot as plt
    import networkx as nx

    nodes, edges = parse_rulegraph(dot)
    graph = nx.DiGraph()
    graph.add_nodes_from(nodes)
    graph.add_edges_from(edges)
    layers = [sorted(layer, key=lambda n: nodes[n]) for layer in nx.topological_generations(graph)]
    pos: dict[str, tuple[float, float]] = {}
    for depth, layer in enumerate(layers):
        if depth:
            def centre(n: str) -> float:
                preds = [pos[p][0] for p in graph.predecessors(n) if p in pos]
                return sum(preds) / len(preds) if preds else 0.0

            layer = sorted(layer, key=centre)
        for i, n in enumerate(layer):  # wide layers alternate up and down: long names do not overlap
            pos[n] = (i - (len(layer) - 1) / 2, -depth + (0.22 * (-1) ** i if len(layer) > 3 else 0.0))
    width = max(len(layer) for layer in layers)
    fig, ax = plt.subplots(figsize=(min(7.2, 1.3 * width + 1), 0.75 * len(layers) + 0.6))
    for a, b in edges:
        ax.annotate("", xy=pos[b], xytext=pos[a], arrowprops={"arrowstyle": "-|>", "color": "0.6", "lw": 0.6,
                                                               "shrinkA": 9, "shrinkB": 9})
    for n, (x, y) in pos.items():
        ax.text(x, y, nodes[n], ha="center", va="center", fontsize=6.2,
                bbox={"boxstyle": "round,pad=0.25", "fc": "#e8f0f8", "ec": PALETTE[0], "lw": 0.6})
    ax.set_xlim(-width / 2 - 0.2, width / 2 - 0.3)
    ax.set_ylim(-len(layers) + 0.6, 0.4)
    ax.axis("off")
    ax.set_title(title)
    return fig


def table_frame(doc: ReportDocument, name: str) -> pl.DataFrame:
    """The report's table block `name` (or the evidence list) as strings, with each row's evidence ids."""
    numbers = {n.id: n for n in doc.numbers}
    if name == "evidence":
        return pl.DataFrame({"id": [e.id for e in doc.evidence], "file": [e.path for e in doc.evidence],
                             "sha256": [e.sha256 for e in doc.evidence], "stage": [e.stage for e in doc.evidence]})
    blocks = [b for s in doc.sections for p in s.subpoints for b in p.blocks if b.id == name]
    if not blocks:
        return pl.DataFrame({"note": ["not computed in this run"]})
    block = blocks[0]
    rows = [[resolve(c, numbers, cite=False) for c in row] for row in block.rows]
    files = {e.id: e.path for e in doc.evidence}
    evidence = [" ".join(dict.fromkeys(files[numbers[i].evidence] for c in row for i in TOKEN.findall(c)))
                for row in block.rows]
    columns = list(block.columns)
    data = {col: [r[k] for r in rows] for k, col in enumerate(columns)}
    if not {"evidence", "file"} & set(columns):  # a block that names its files already keeps its columns
        data["evidence"] = evidence
    return pl.DataFrame(data, schema={c: pl.Utf8 for c in data})


def to_latex(frame: pl.DataFrame, caption: str) -> str:
    """A booktabs LaTeX table (pandas' Styler.to_latex, LaTeX-escaped cells)."""
    styler = frame.to_pandas().style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    return styler.to_latex(hrules=True, caption=latex_escape(caption), position="htbp")


def latex_escape(s: str) -> str:
    return re.sub(r"([&%$#_{}])", r"\\\1", s).replace("~", r"\textasciitilde{}").replace("^", r"\^{}")


def paper_figures(cfg: ReportConfig, *, run_manifest: Path, rulegraph: Path, png: list[Path], pdf: list[Path],
                  tables: list[Path], run: str) -> dict[str, int]:
    """Write every paper figure (PNG + PDF) and table (CSV + LaTeX) of `run` (see the module docstring)."""
    from mechflow.report.stage import build_report

    doc = build_report(cfg, run_manifest=run_manifest, provider=ProviderFile(), run=run, commands=[])
    numbers = {n.id: n for n in doc.numbers}
    draw = {"tasks": figure_tasks, "circuits": figure_circuits, "reference": figure_reference,
            "dictionaries": figure_dictionaries, "graphs": figure_graphs,
            "dag": lambda doc, numbers, cfg: figure_dag(Path(rulegraph).read_text(), f"{doc.model}: the rules of "
                                                        "this run (snakemake --rulegraph)")}
    by_stem = {Path(p).stem: Path(p) for p in png}
    pdf_by_stem = {Path(p).stem: Path(p) for p in pdf}
    import matplotlib.pyplot as plt

    with style():
        for name in FIGURES:
            fig = draw[name](doc, numbers, cfg)
            save_figure(fig, by_stem[name])
            save_figure(fig, pdf_by_stem[name])
            plt.close(fig)
    for path in map(Path, tables):
        frame = table_frame(doc, path.stem)
        if path.suffix == ".csv":
            atomic_write_text(path, frame.write_csv())
        else:
            atomic_write_text(path, to_latex(frame, f"{doc.model}: {path.stem} (run {run}; evidence: the files "
                                                    "named, with their sha256 in tables/evidence.csv)"))
    log.info("figures: %d figures, %d tables of run %s", len(FIGURES), len(TABLES), run)
    return {"figures": len(FIGURES), "tables": len(TABLES)}
