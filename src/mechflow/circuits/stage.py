"""The `circuit` stage: minimal faithful edge circuit of one task on one model, and its evidence.

1. Take the first `n_prompts` pairs of the task's largest equal-length bucket.
2. `discover_circuit`: EAP-IG edge scores, exact faithfulness curve, bisection for the smallest
   prefix with f >= target, exact sufficiency / comprehensiveness (all exact forward passes).
3. Re-evaluate per prompt (exact) the full model, the empty circuit, the circuit, the model with
   only the circuit patched, and every budget of the curve: the statistics stage bootstraps these.
4. Write `circuit.json` (recomputable from the file alone: `reevaluate_circuit`), the edge score
   table, a DOT file and a PNG drawing of the circuit, and a markdown summary.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402

from mechflow.circuits.config import CircuitConfig  # noqa: E402
from mechflow.circuits.core import discover_circuit  # noqa: E402
from mechflow.circuits.faithfulness import CircuitEvaluator, prefix_mask, ranked_edges  # noqa: E402
from mechflow.circuits.forward import check_edge_model  # noqa: E402
from mechflow.circuits.graph import EdgeGraph  # noqa: E402
from mechflow.circuits.result import CircuitFile, TargetMetricSpec, write_circuit  # noqa: E402
from mechflow.io import atomic_path, atomic_write_text, sha256_file  # noqa: E402
from mechflow.tasks import TaskDataset, select_batch  # noqa: E402

log = logging.getLogger(__name__)

STAGE_KEYS = ("n_prompts", "draw_max_edges")


def _write_parquet(frame: pl.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp, compression="zstd")


def _per_prompt_tables(ev: CircuitEvaluator, graph: EdgeGraph, order: torch.Tensor, doc: CircuitFile
                       ) -> tuple[pl.DataFrame, pl.DataFrame]:
    valid = graph.valid
    kept = prefix_mask(order, doc.n_edges, graph)
    with torch.no_grad():
        full = ev.metric_per_prompt(valid).double()
        empty = ev.metric_per_prompt(torch.zeros_like(valid)).double()
        circuit = ev.metric_per_prompt(kept & valid).double()
        without = ev.metric_per_prompt(valid & ~kept).double()
        n = full.shape[0]
        prompts = pl.DataFrame({"prompt": pl.Series(range(n), dtype=pl.Int32), "m_full": full.tolist(),
                                "m_empty": empty.tolist(), "m_circuit": circuit.tolist(),
                                "m_without_circuit": without.tolist()})
        rows = []
        for point in doc.curve:
            values = ev.metric_per_prompt(prefix_mask(order, point.n_edges, graph)).double().tolist()
            rows += [{"budget_pct": float(point.percent), "n_edges": int(point.n_edges), "prompt": i, "metric": v}
                     for i, v in enumerate(values)]
    curve = pl.DataFrame(rows, schema={"budget_pct": pl.Float64, "n_edges": pl.Int64, "prompt": pl.Int32,
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


def _node_layer(name: str, n_layers: int) -> float:
    """Vertical position: input at -1, a{l} at l, m{l} at l + 0.5, logits at n_layers."""
    base = name.split("<")[0]
    if base == "input":
        return -1.0
    if base == "logits":
        return float(n_layers)
    if base.startswith("a"):
        return float(base[1:].split(".")[0])
    return float(base[1:]) + 0.5


def circuit_dot(edges: list[tuple[str, str, float]]) -> str:
    """Graphviz DOT of the circuit (edge colour: sign of the score, width: |score|)."""
    biggest = max((abs(s) for _, _, s in edges), default=1.0) or 1.0
    lines = ["digraph circuit {", "  rankdir=BT;", "  node [shape=box, fontsize=10];"]
    for sender, receiver, score in edges:
        colour = "#1f77b4" if score >= 0 else "#d62728"
        width = 0.5 + 3.0 * abs(score) / biggest
        lines.append(f'  "{sender}" -> "{receiver.split("<")[0]}" '
                     f'[color="{colour}", penwidth={width:.2f}, label="{receiver[receiver.find("<"):] if "<" in receiver else ""}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw_circuit(edges: list[tuple[str, str, float]], n_layers: int, path: Path, title: str) -> None:
    """A layered drawing (no Graphviz binary needed): nodes by layer, edges coloured by score sign."""
    nodes = sorted({n for s, r, _ in edges for n in (s, r.split("<")[0])}, key=lambda n: (_node_layer(n, n_layers), n))
    by_layer: dict[float, list[str]] = {}
    for n in nodes:
        by_layer.setdefault(_node_layer(n, n_layers), []).append(n)
    pos = {n: (i - (len(group) - 1) / 2, y) for y, group in by_layer.items() for i, n in enumerate(group)}
    fig, ax = plt.subplots(figsize=(10, max(4, 0.35 * (n_layers + 2))))
    biggest = max((abs(s) for _, _, s in edges), default=1.0) or 1.0
    for sender, receiver, score in edges:
        (x0, y0), (x1, y1) = pos[sender], pos[receiver.split("<")[0]]
        ax.plot([x0, x1], [y0, y1], color="tab:blue" if score >= 0 else "tab:red",
                lw=0.3 + 2.5 * abs(score) / biggest, alpha=0.6)
    for n, (x, y) in pos.items():
        ax.text(x, y, n, ha="center", va="center", fontsize=6,
                bbox={"boxstyle": "round", "fc": "white", "ec": "grey", "lw": 0.5})
    ax.set_ylabel("layer")
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)


def _summary_md(doc: CircuitFile, task: str, n_prompts: int) -> str:
    rows = "\n".join(f"| {p.percent:g}% | {p.n_edges} | {p.metric:.4f} | {p.faithfulness:.3f} |" for p in doc.curve)
    return f"""# Circuit: {doc.model.get('name')} × {task}

All numbers are exact patched forward passes (`circuit.json`; per-prompt values in
`circuit_prompts.parquet` and `curve_prompts.parquet`), on {n_prompts} prompt pairs.

| quantity | value |
|---|---|
| edges in the graph | {doc.n_edges_total} |
| edges in the minimal faithful circuit (target f ≥ {doc.target}) | {doc.n_edges} |
| m(N) full model / m(∅) empty circuit / m(C) circuit | {doc.m_full:.4f} / {doc.m_empty:.4f} / {doc.m_circuit:.4f} |
| normalized faithfulness f(C) | {doc.faithfulness:.3f} (one edge fewer: {doc.faithfulness_one_fewer:.3f}) |
| sufficiency / comprehensiveness / F1 | {doc.sufficiency:.3f} / {doc.comprehensiveness:.3f} / {doc.f1:.3f} |
| CPR (area under f) / CMD (area under \\|1 − f\\|) | {doc.cpr:.3f} / {doc.cmd:.3f} |
| exact circuit evaluations | {doc.n_evaluations} |
| edge ranking | {doc.method} (config hash {doc.config_hash[:12]}) |

## Faithfulness curve (MIB budgets)
| budget | edges | m | f |
|---|---|---|---|
{rows}
"""


def run_circuit(cfg: dict, *, model_cfg: dict, dataset: Path, circuit: Path, edge_scores: Path,
                circuit_prompts: Path, curve_prompts: Path, dot: Path, figure: Path, summary: Path,
                task: str = "task") -> dict:
    """Stage function of rule `circuit` (steps 1-4 of the module docstring)."""
    from mechflow.models import load_model_from_cfg

    ccfg = CircuitConfig.from_dict({k: v for k, v in cfg.items() if k not in STAGE_KEYS})
    loaded = load_model_from_cfg(model_cfg)
    model = loaded.model
    check_edge_model(model)
    ds = TaskDataset.load(dataset)
    batch = select_batch(ds, int(cfg.get("n_prompts", 16)), dataset)
    spec = TargetMetricSpec.from_task_batch(batch)
    doc, scores = discover_circuit(model, batch, ccfg, model_cfg=model_cfg, metric_spec=spec,
                                   prompt_ids=[str(i) for i in batch.example_ids],
                                   dataset_sha256=sha256_file(dataset), progress=True)
    write_circuit(circuit, doc)

    graph = EdgeGraph.from_cfg(model.cfg)
    order = ranked_edges(scores, graph, absolute=ccfg.absolute)
    ev = CircuitEvaluator(model, batch, graph)
    prompts, curve = _per_prompt_tables(ev, graph, order, doc)
    _write_parquet(prompts, circuit_prompts)
    _write_parquet(curve, curve_prompts)
    table = _edge_table(scores, graph, order, doc.n_edges)
    _write_parquet(table, edge_scores)

    shown = table.head(min(doc.n_edges, int(cfg.get("draw_max_edges", 150))))
    triples = list(zip(shown["sender"], shown["receiver"], shown["score"]))
    atomic_write_text(dot, circuit_dot(triples))
    draw_circuit(triples, graph.n_layers, figure,
                 f"{model_cfg['name']} × {task}: top {len(triples)} of {doc.n_edges} circuit edges "
                 f"(f = {doc.faithfulness:.2f}); blue +, red −")
    atomic_write_text(summary, _summary_md(doc, task, len(batch)))
    log.info("circuit %s: %d edges, f=%.3f", task, doc.n_edges, doc.faithfulness)
    return {"n_edges": doc.n_edges, "faithfulness": doc.faithfulness, "sufficiency": doc.sufficiency,
            "comprehensiveness": doc.comprehensiveness, "cpr": doc.cpr, "cmd": doc.cmd}
