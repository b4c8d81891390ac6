"""The `circuit` stage: minimal faithful circuit of one task on one model, and its evidence.

1. Take the first `n_prompts` pairs of the task's largest equal-length bucket.
2. `discover_circuit`: unit (`circuits.unit`: edges where the model supports edge patching, else
   nodes), EAP-IG scores, exact faithfulness curve, bisection for the smallest prefix with
   f >= target, exact sufficiency / comprehensiveness (all exact forward passes).
3. Re-evaluate per prompt (exact) the full model, the empty circuit, the circuit, the model with
   only the circuit patched, and every budget of the curve: the statistics stage bootstraps these.
4. Write `circuit.json` (recomputable from the file alone: `reevaluate_circuit`), the ranked score
   table, a DOT file and a PNG drawing of the circuit, and a markdown summary.

The score table keeps the rule's file name ``edge_scores.parquet`` for both units. Edge circuits:
columns edge, sender, receiver, score, rank, in_circuit (one row per edge). Node circuits:
columns node, kind, layer, head, score, rank, in_circuit (one row per node; no ``edge`` column, so
no edge reader can mistake it), and the Parquet metadata ``mechflow.unit`` says which. Every table
is checked against its contract (`mechflow.contracts.parquet`) before it is written.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import polars as pl
import pyarrow.parquet as pq
import torch

from mechflow.circuits.config import CircuitConfig
from mechflow.circuits.core import discover_circuit, resolve_unit
from mechflow.circuits.faithfulness import CircuitEvaluator, ranked_edges
from mechflow.circuits.graph import EdgeGraph
from mechflow.circuits.nodes import NodeEvaluator, ranked_nodes
from mechflow.circuits.result import CircuitFile, TargetMetricSpec, write_circuit
from mechflow.contracts.names import INPUT, LOGITS, node_kind, receiver_node
from mechflow.contracts.parquet import (
    CIRCUIT_PROMPTS_SCHEMA,
    UNIT_KEY,
    check_schema,
    curve_prompts_schema,
    edge_scores_schema,
)
from mechflow.io import atomic_path, atomic_write_text, sha256_file
from mechflow.plotting import save_figure
from mechflow.tasks import TaskDataset, select_batch

log = logging.getLogger(__name__)

def _write_parquet(frame: pl.DataFrame, path: Path, unit: str = "edges", contract=None) -> None:
    with atomic_path(path) as tmp:
        table = frame.to_arrow()
        if contract is not None:
            check_schema(table.schema, contract, Path(path).name)
        meta = dict(table.schema.metadata or {})
        meta[UNIT_KEY] = unit.encode()
        pq.write_table(table.replace_schema_metadata(meta), tmp, compression="zstd")


def _per_prompt_tables(ev: CircuitEvaluator | NodeEvaluator, order: torch.Tensor, doc: CircuitFile
                       ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per-prompt metrics; the curve table counts the unit in ``n_edges`` or ``n_nodes``."""
    every = ev.universe
    kept = ev.prefix(order, doc.n_units)
    with torch.no_grad():
        full = ev.metric_per_prompt(every).double()
        empty = ev.metric_per_prompt(torch.zeros_like(every)).double()
        circuit = ev.metric_per_prompt(kept & every).double()
        without = ev.metric_per_prompt(every & ~kept).double()
        n = full.shape[0]
        prompts = pl.DataFrame({"prompt": pl.Series(range(n), dtype=pl.Int32), "m_full": full.tolist(),
                                "m_empty": empty.tolist(), "m_circuit": circuit.tolist(),
                                "m_without_circuit": without.tolist()})
        count = f"n_{doc.unit}"
        rows = []
        for point in doc.curve:
            values = ev.metric_per_prompt(ev.prefix(order, point.n_units)).double().tolist()
            rows += [{"budget_pct": float(point.percent), count: int(point.n_units), "prompt": i, "metric": v}
                     for i, v in enumerate(values)]
    curve = pl.DataFrame(rows, schema={"budget_pct": pl.Float64, count: pl.Int64, "prompt": pl.Int32,
                                       "metric": pl.Float64})
    return prompts, curve


def _edge_table(scores: torch.Tensor, graph: EdgeGraph, order: torch.Tensor, n_kept: int) -> pl.DataFrame:
    senders, receivers = graph.sender_names, graph.receiver_names
    flat = order.tolist()
    n_r = graph.n_receivers
    flat_scores = scores.flatten().double()
    return pl.DataFrame({
        "edge": [f"{senders[i // n_r]}->{receivers[i % n_r]}" for i in flat],
        "sender": [senders[i // n_r] for i in flat],
        "receiver": [receivers[i % n_r] for i in flat],
        "score": flat_scores[order].tolist(),
        "rank": pl.Series(range(1, len(flat) + 1), dtype=pl.Int64),
        "in_circuit": [r < n_kept for r in range(len(flat))],
    })


def _node_table(scores: torch.Tensor, graph: EdgeGraph, order: torch.Tensor, n_kept: int) -> pl.DataFrame:
    """Node ranking (the node circuit's ``edge_scores.parquet``): one row per node, best first."""
    names = [graph.sender_names[i] for i in order.tolist()]
    kinds = [node_kind(n) for n in names]
    return pl.DataFrame({
        "node": names,
        "kind": [k for k, _, _ in kinds],
        "layer": pl.Series([layer for _, layer, _ in kinds], dtype=pl.Int64),
        "head": pl.Series([head for _, _, head in kinds], dtype=pl.Int64),
        "score": scores.double()[order].tolist(),
        "rank": pl.Series(range(1, len(names) + 1), dtype=pl.Int64),
        "in_circuit": [r < n_kept for r in range(len(names))],
    })


def _node_layer(name: str, n_layers: int) -> float:
    """Vertical position: input at -1, a{l} at l, m{l} at l + 0.5, logits at n_layers."""
    base = receiver_node(name)
    if base == INPUT:
        return -1.0
    if base == LOGITS:
        return float(n_layers)
    kind, layer, _ = node_kind(base)
    return float(layer) if kind == "head" else float(layer) + 0.5


def circuit_dot(edges: list[tuple[str, str, float]]) -> str:
    """Graphviz DOT of the circuit (edge colour: sign of the score, width: |score|)."""
    biggest = max((abs(s) for _, _, s in edges), default=1.0) or 1.0
    lines = ["digraph circuit {", "  rankdir=BT;", "  node [shape=box, fontsize=10];"]
    for sender, receiver, score in edges:
        colour = "#1f77b4" if score >= 0 else "#d62728"
        width = 0.5 + 3.0 * abs(score) / biggest
        lines.append(f'  "{sender}" -> "{receiver_node(receiver)}" '
                     f'[color="{colour}", penwidth={width:.2f}, '
                     f'label="{receiver[receiver.find("<"):] if "<" in receiver else ""}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw_circuit(edges: list[tuple[str, str, float]], n_layers: int, path: Path, title: str) -> None:
    """A layered drawing (no Graphviz binary needed): nodes by layer, edges coloured by score sign."""
    nodes = sorted({n for s, r, _ in edges for n in (s, receiver_node(r))}, key=lambda n: (_node_layer(n, n_layers), n))
    by_layer: dict[float, list[str]] = {}
    for n in nodes:
        by_layer.setdefault(_node_layer(n, n_layers), []).append(n)
    pos = {n: (i - (len(group) - 1) / 2, y) for y, group in by_layer.items() for i, n in enumerate(group)}
    fig, ax = plt.subplots(figsize=(10, max(4, 0.35 * (n_layers + 2))))
    biggest = max((abs(s) for _, _, s in edges), default=1.0) or 1.0
    for sender, receiver, score in edges:
        (x0, y0), (x1, y1) = pos[sender], pos[receiver_node(receiver)]
        ax.plot([x0, x1], [y0, y1], color="tab:blue" if score >= 0 else "tab:red",
                lw=0.3 + 2.5 * abs(score) / biggest, alpha=0.6)
    for n, (x, y) in pos.items():
        ax.text(x, y, n, ha="center", va="center", fontsize=6,
                bbox={"boxstyle": "round", "fc": "white", "ec": "grey", "lw": 0.5})
    ax.set_ylabel("layer")
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)
    plt.close(fig)


def node_dot(nodes: list[tuple[str, float]]) -> str:
    """Graphviz DOT of a node circuit: nodes ranked by layer (fill: sign of the score, border: |score|),
    linked in residual-stream order (the circuit's nodes communicate only through the residual)."""
    biggest = max((abs(s) for _, s in nodes), default=1.0) or 1.0
    lines = ["digraph circuit {", "  rankdir=BT;", "  node [shape=box, style=filled, fontsize=10];"]
    for name, score in nodes:
        colour = "#aec7e8" if score >= 0 else "#ff9896"
        lines.append(f'  "{name}" [fillcolor="{colour}", penwidth={0.5 + 3.0 * abs(score) / biggest:.2f}, '
                     f'tooltip="score {score:.4g}"];')
    layered: dict[float, list[str]] = {}
    for name, _ in nodes:
        layered.setdefault(_node_layer(name, 10**6), []).append(name)
    for group in layered.values():
        lines.append("  { rank=same; " + " ".join(f'"{n}";' for n in group) + " }")
    levels = [layered[k] for k in sorted(layered)]
    for lower, upper in itertools.pairwise(levels):
        lines.append(f'  "{lower[0]}" -> "{upper[0]}" [style=dotted, arrowhead=none];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw_nodes(nodes: list[tuple[str, float]], n_layers: int, n_heads: int, path: Path, title: str) -> None:
    """Layer x (head, MLP) grid of the node circuit: marker area |score|, colour its sign."""
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * (n_heads + 2)), max(4, 0.3 * (n_layers + 2))))
    biggest = max((abs(s) for _, s in nodes), default=1.0) or 1.0
    for name, score in nodes:
        kind, layer, head = node_kind(name)
        x = {"input": n_heads / 2, "head": head, "mlp": n_heads + 0.5}[kind]
        ax.scatter([x], [layer], s=30 + 300 * abs(score) / biggest, c="tab:blue" if score >= 0 else "tab:red",
                   alpha=0.7, edgecolors="k", linewidths=0.5)
        ax.annotate(name, (x, layer), fontsize=6, ha="center", va="bottom", xytext=(0, 5), textcoords="offset points")
    ax.set_xticks(list(range(n_heads)) + [n_heads + 0.5], [f"h{h}" for h in range(n_heads)] + ["MLP"], fontsize=7)
    ax.set_ylim(-1.5, n_layers)
    ax.set_ylabel("layer (input at -1)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)
    plt.close(fig)


def _summary_md(doc: CircuitFile, task: str, n_prompts: int) -> str:
    unit = doc.unit  # "edges" | "nodes"
    one = unit[:-1]
    rows = "\n".join(f"| {p.percent:g}% | {p.n_units} | {p.metric:.4f} | {p.faithfulness:.3f} |" for p in doc.curve)
    why = ("" if unit == "edges" else
           "\nNode circuit (`circuits.unit`): every head / MLP / the input embedding outside the circuit takes its "
           "corrupted activation; `edge_scores.parquet` holds the node ranking.\n")
    return f"""# Circuit: {doc.model.get('name')} × {task}

All numbers are exact patched forward passes (`circuit.json`; per-prompt values in
`circuit_prompts.parquet` and `curve_prompts.parquet`), on {n_prompts} prompt pairs.
{why}
| quantity | value |
|---|---|
| {unit} in the model | {doc.n_units_total} |
| {unit} in the minimal faithful circuit (target f ≥ {doc.target}) | {doc.n_units} |
| m(N) full model / m(∅) empty circuit / m(C) circuit | {doc.m_full:.4f} / {doc.m_empty:.4f} / {doc.m_circuit:.4f} |
| normalized faithfulness f(C) | {doc.faithfulness:.3f} (one {one} fewer: {doc.faithfulness_one_fewer:.3f}) |
| sufficiency / comprehensiveness / F1 | {doc.sufficiency:.3f} / {doc.comprehensiveness:.3f} / {doc.f1:.3f} |
| CPR (area under f) / CMD (area under \\|1 − f\\|) | {doc.cpr:.3f} / {doc.cmd:.3f} |
| exact circuit evaluations | {doc.n_evaluations} |
| {one} ranking | {doc.method} (config hash {doc.config_hash[:12]}) |

## Faithfulness curve (MIB budgets)
| budget | {unit} | m | f |
|---|---|---|---|
{rows}
"""


def circuits(cfg: CircuitConfig | Mapping[str, Any], *, model_cfg: dict, dataset: Path, circuit: Path,
                edge_scores: Path, circuit_prompts: Path, curve_prompts: Path, dot: Path, figure: Path, summary: Path,
                task: str = "task") -> dict:
    """Stage function of rule `circuits` (steps 1-4 of the module docstring), for edge and node circuits."""
    from mechflow.models import load_model_from_cfg

    ccfg = CircuitConfig.from_dict(cfg)  # typed once: the class holds every default and check
    loaded = load_model_from_cfg(model_cfg)
    model = loaded.model
    unit = resolve_unit(ccfg.unit, model, model_cfg)  # fails early (before loading data) where edges are undefined
    ds = TaskDataset.load(dataset)
    batch = select_batch(ds, ccfg.n_prompts, dataset)
    spec = TargetMetricSpec.from_task_batch(batch)
    doc, scores = discover_circuit(model, batch, ccfg, model_cfg=model_cfg, metric_spec=spec,
                                   prompt_ids=[str(i) for i in batch.example_ids],
                                   dataset_sha256=sha256_file(dataset), progress=True)
    write_circuit_outputs(model, batch, ccfg, doc, scores, circuit=circuit, edge_scores=edge_scores,
                          circuit_prompts=circuit_prompts, curve_prompts=curve_prompts, dot=dot, figure=figure,
                          summary=summary, task=task, draw_max=ccfg.draw_max_edges)
    log.info("circuit %s: %d %s, f=%.3f", task, doc.n_units, unit, doc.faithfulness)
    return {"unit": unit, "n_units": doc.n_units, "n_edges": doc.n_edges, "faithfulness": doc.faithfulness,
            "sufficiency": doc.sufficiency, "comprehensiveness": doc.comprehensiveness, "cpr": doc.cpr,
            "cmd": doc.cmd}


def write_circuit_outputs(model, batch, ccfg: CircuitConfig, doc: CircuitFile, scores: torch.Tensor, *,
                          circuit: Path, edge_scores: Path, circuit_prompts: Path, curve_prompts: Path, dot: Path,
                          figure: Path, summary: Path, task: str = "task", draw_max: int = 150) -> None:
    """Steps 3-4 for a circuit found by `discover_circuit` (``doc``, ``scores``) on ``batch``."""
    write_circuit(circuit, doc)
    graph = EdgeGraph.from_cfg(model.cfg)
    if doc.unit == "edges":
        order = ranked_edges(scores, graph, absolute=ccfg.absolute)
        ev = CircuitEvaluator(model, batch, graph)
        table = _edge_table(scores, graph, order, doc.n_units)
    else:
        order = ranked_nodes(scores, absolute=ccfg.absolute)
        ev = NodeEvaluator(model, batch, graph)
        table = _node_table(scores, graph, order, doc.n_units)
    prompts, curve = _per_prompt_tables(ev, order, doc)
    _write_parquet(prompts, circuit_prompts, doc.unit, CIRCUIT_PROMPTS_SCHEMA)
    _write_parquet(curve, curve_prompts, doc.unit, curve_prompts_schema(doc.unit))
    _write_parquet(table, edge_scores, doc.unit, edge_scores_schema(doc.unit))

    name = doc.model.get("name", "model")
    shown = table.head(min(doc.n_units, draw_max))
    if doc.unit == "edges":
        triples = list(zip(shown["sender"], shown["receiver"], shown["score"]))
        atomic_write_text(dot, circuit_dot(triples))
        draw_circuit(triples, graph.n_layers, figure,
                     f"{name} × {task}: top {len(triples)} of {doc.n_units} circuit edges "
                     f"(f = {doc.faithfulness:.2f}); blue +, red −")
    else:
        pairs = list(zip(shown["node"], shown["score"]))
        atomic_write_text(dot, node_dot(pairs))
        draw_nodes(pairs, graph.n_layers, graph.n_heads, figure,
                   f"{name} × {task}: {len(pairs)} of {doc.n_units} circuit nodes "
                   f"(f = {doc.faithfulness:.2f}); blue +, red −")
    atomic_write_text(summary, _summary_md(doc, task, batch.clean_tokens.shape[0]))
