"""The ``reference`` stage: ROC AUC and correlations of every attribution method vs exact patching.

Steps:

1. Nodes: read the ``attribute`` rule's per-prompt exact / AP / IG scores of every head and MLP
   (``node_scores.parquet``; nothing is recomputed), average over prompts, and score AP and IG
   against the exact reference.
2. Edges (skipped, with the reason, when ``edge_reference.parquet`` says edges are undefined for
   the model): read the cached exact single-edge effects; take EAP and EAP-IG edge scores
   (Syed et al. 2023; Hanna et al. 2024) from the circuit stage's ``edge_scores.parquet`` when its
   prompts (and EAP-IG settings) are those of the reference, otherwise compute them
   (`mechflow.circuits.eap.edge_scores`) on the reference's prompts; score them on the restricted
   graph's edges and on the stratified full-graph sample separately.
3. Per item set and method: ROC AUC of |score| under both positives definitions
   (`mechflow.reference.auc`), Pearson / Spearman of signed scores, Spearman of |scores|.
4. Write ``auc.json`` (every number, the positives definitions and the sampling), ``roc.png`` and,
   last, ``reference.md``, each atomically.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from mechflow.benchmark.roc import roc_curve
from mechflow.circuits.eap import edge_scores as compute_edge_scores
from mechflow.circuits.graph import EdgeGraph
from mechflow.contracts.documents import write_document
from mechflow.contracts.reference import AucDocument
from mechflow.contracts.versions import SCHEMA_VERSION
from mechflow.errors import DataError
from mechflow.io import atomic_write_text, canonical_hash
from mechflow.plotting import save_figure
from mechflow.reference.auc import VARIANTS, method_report, positives
from mechflow.reference.config import ReferenceConfig
from mechflow.reference.edges import prompts_hash, read_edge_reference

log = logging.getLogger(__name__)

NODE_METHODS = {"ap": "attribution patching", "ig": "IG patching"}
EDGE_METHODS = ("eap", "eap-ig")
EDGE_SETS = {"restricted": "every edge of the restricted graph", "sampled": "stratified sample of the full graph"}


# ---------------------------------------------------------------------------- nodes
def node_part(node_scores: Path, node_prompts: Path, rcfg: ReferenceConfig) -> tuple[dict, dict]:
    """Step 1: the ``nodes`` section of auc.json, and the vectors for the ROC figure."""
    try:
        ns = pl.read_parquet(node_scores)
        pr = pl.read_parquet(node_prompts)
    except Exception as exc:
        raise DataError(f"{node_scores} / {node_prompts}: cannot read the attribute rule's tables ({exc}); "
                        "re-run rule attribute") from exc
    means = (ns.group_by("method", "component", "kind", "layer", "head").agg(pl.col("score").mean(),
                                                                             pl.len().alias("n"))
             .sort("layer", "kind", "head"))
    if "exact" not in set(means["method"]):
        raise DataError(f"{node_scores}: no 'exact' rows; "
                        "the node reference needs attribution.methods to include exact")
    exact_rows = means.filter(pl.col("method") == "exact")
    components = exact_rows["component"].to_list()
    exact = exact_rows["score"].to_numpy()
    scale = float(pr["clean_metric"].mean() - pr["corrupted_metric"].mean())
    pos = positives(exact, rcfg.positives.top_fraction, rcfg.positives.threshold, scale)
    methods, vectors = {}, {"exact": exact}
    for m in sorted(set(means["method"]) - {"exact"}):
        other = means.filter(pl.col("method") == m).select("component", "score")
        by_name = dict(zip(other["component"].to_list(), other["score"].to_list()))
        if set(by_name) != set(components):
            raise DataError(f"{node_scores}: method {m!r} scores other components than 'exact'")
        vectors[m] = np.array([by_name[c] for c in components])
        methods[m] = method_report(vectors[m], exact, pos)
    section = {"source": str(node_scores), "n_components": len(components),
               "n_prompts": int(exact_rows["n"].max()), "scale_m_clean_minus_m_corrupted": scale,
               "positives": {v: {k: x for k, x in pos[v].items() if k != "labels"} for v in VARIANTS},
               "methods": methods}
    return section, {"vectors": vectors, "positives": pos}


# ---------------------------------------------------------------------------- edges
def _dense(frame: pl.DataFrame, graph: EdgeGraph) -> torch.Tensor:
    out = torch.zeros(graph.valid.shape, dtype=torch.float64)
    try:
        for name, score in zip(frame["edge"].to_list(), frame["score"].to_list()):
            out[graph.edge_index(name)] = score
    except KeyError as exc:
        raise DataError(f"edge_scores.parquet: {exc} is not an edge of this model's graph; "
                        "re-run rule circuit") from None
    return out


def circuit_scores(circuit: Path | None, edge_scores: Path | None, graph: EdgeGraph, batch, ids: list[str],
                   rcfg: ReferenceConfig) -> tuple[str | None, torch.Tensor | None, str]:
    """The circuit stage's edge scores when they were computed on these prompts (and, for EAP-IG,
    with these settings): (method, scores, note); (None, None, why not) otherwise."""
    if circuit is None or edge_scores is None:
        return None, None, "no circuit outputs given"
    from mechflow.circuits.result import read_circuit

    doc = read_circuit(circuit)
    if getattr(doc, "unit", "edges") != "edges":
        return None, None, f"{circuit.name} is a node circuit (its score table ranks nodes)"
    p = doc.prompts
    if (p.prompt_ids != ids or p.clean_tokens != batch.clean_tokens.tolist()
            or p.corrupted_tokens != batch.corrupted_tokens.tolist()):
        return None, None, f"{circuit.name} used other prompts ({len(p.clean_tokens)} pairs)"
    if doc.method == "eap-ig" and (doc.config.get("ig_steps"), doc.config.get("ig_rule")) != (rcfg.ig_steps,
                                                                                               rcfg.ig_rule):
        return None, None, (f"{circuit.name} EAP-IG settings ig_steps={doc.config.get('ig_steps')}, "
                            f"ig_rule={doc.config.get('ig_rule')} differ from reference.ig_steps/ig_rule")
    try:
        frame = pl.read_parquet(edge_scores, columns=["edge", "score"])
    except Exception as exc:
        raise DataError(f"{edge_scores}: cannot read the circuit rule's edge scores ({exc}); "
                        "re-run rule circuit") from exc
    return doc.method, _dense(frame, graph), f"reused {edge_scores} ({doc.method}, same prompts)"


def method_scores(model, batch, graph: EdgeGraph, ids: list[str], rcfg: ReferenceConfig, circuit: Path | None,
                  edge_scores: Path | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """EAP and EAP-IG scores ``[n_senders, n_receivers]`` and where each came from."""
    reused, scores, why = circuit_scores(circuit, edge_scores, graph, batch, ids, rcfg)
    out, source = {}, {}
    for method in EDGE_METHODS:
        if method == reused:
            out[method], source[method] = scores, why
            continue
        out[method] = compute_edge_scores(model, batch, method, steps=rcfg.ig_steps, rule=rcfg.ig_rule,
                                          graph=graph, progress=True).double()
        detail = f"ig_steps={rcfg.ig_steps}, ig_rule={rcfg.ig_rule}" if method == "eap-ig" else "one gradient"
        source[method] = f"computed here on the reference prompts ({detail}); circuit scores not used: " + (
            why if reused is None else f"the circuit ranked by {reused}")
    return out, source


def edge_part(edge_reference: Path, rcfg: ReferenceConfig, model_cfg: dict, dataset: Path, circuit: Path | None,
              edge_scores: Path | None, model: Any = None) -> tuple[dict, dict | None]:
    """Step 2-3: the ``edges`` section of auc.json, and the vectors for the ROC figure (None if skipped)."""
    table, doc = read_edge_reference(edge_reference)
    meta = {k: v for k, v in doc.items() if k not in ("prompt_ids",)}
    if doc.get("skipped"):
        return {"skipped": doc["skipped"], "edge_reference": meta}, None
    if doc["config_hash"] != rcfg.exact_hash():
        raise DataError(f"{edge_reference}: computed with other reference settings (config hash "
                        f"{doc['config_hash'][:12]} != {rcfg.exact_hash()[:12]}); re-run rule edge_reference")
    from mechflow.benchmark.core import load_task_batch

    loaded, _, batch = load_task_batch(model_cfg, Path(dataset), rcfg.n_prompts, model)
    ids = [str(i) for i in batch.example_ids]
    if prompts_hash(batch, ids) != doc["prompts_hash"]:
        raise DataError(f"{edge_reference}: its prompts are not the first {rcfg.n_prompts} of {dataset}; "
                        "re-run rule edge_reference")
    graph = EdgeGraph.from_cfg(loaded.model.cfg)
    scores, source = method_scores(loaded.model, batch, graph, ids, rcfg, circuit, edge_scores)
    frame = pl.from_arrow(table)
    idx = [graph.edge_index(n) for n in frame["edge"].to_list()]
    s_idx = torch.tensor([i for i, _ in idx], dtype=torch.long)
    r_idx = torch.tensor([j for _, j in idx], dtype=torch.long)
    scale = doc["m_full"] - doc["m_empty"]
    sets, vectors = {}, {}
    for name, description in EDGE_SETS.items():
        sel = frame[name].to_numpy()
        exact = frame["exact_effect"].to_numpy()[sel]
        pos = positives(exact, rcfg.positives.top_fraction, rcfg.positives.threshold, scale)
        vec = {"exact": exact}
        reports = {}
        for method in EDGE_METHODS:
            vec[method] = scores[method][s_idx, r_idx].numpy()[sel]
            reports[method] = method_report(vec[method], exact, pos)
        sets[name] = {"description": description, "n_edges": int(sel.sum()),
                      "positives": {v: {k: x for k, x in pos[v].items() if k != "labels"} for v in VARIANTS},
                      "methods": reports}
        vectors[name] = {"vectors": vec, "positives": pos}
    section = {"skipped": None, "edge_reference": meta, "scale_m_full_minus_m_empty": scale,
               "scores_source": source, "sets": sets}
    return section, vectors


# ---------------------------------------------------------------------------- outputs
def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _plot(roc: Path, nodes: dict, edges: dict | None, skipped: str | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("nodes (heads + MLPs)", nodes)] + [(f"edges: {EDGE_SETS[k]}", (edges or {}).get(k)) for k in EDGE_SETS]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, (name, data) in zip(axes, panels):
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=name)
        if data is None:
            ax.text(0.5, 0.5, "skipped:\n" + "\n".join(textwrap.wrap(skipped or "", 45)[:8]),
                    ha="center", va="center", fontsize=7, transform=ax.transAxes)
            continue
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls=":")
        for i, method in enumerate(m for m in data["vectors"] if m != "exact"):
            score = np.abs(data["vectors"][method])
            for variant, ls in zip(VARIANTS, ("-", "--")):
                labels = data["positives"][variant]["labels"]
                if 0 < labels.sum() < labels.size:
                    fpr, tpr = roc_curve(score, labels)
                    ax.plot(fpr, tpr, ls=ls, color=f"C{i}", label=f"{method}, {variant}")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, roc, dpi=120)
    plt.close(fig)


def _markdown(doc: dict, model_name: str, task: str) -> str:
    n, e = doc["nodes"], doc["edges"]
    rows = [f"| nodes ({n['n_components']} heads + MLPs) | {NODE_METHODS.get(m, m)} | "
            f"{_fmt(r['roc_auc']['top_k'])} | {_fmt(r['roc_auc']['threshold'])} | {_fmt(r['pearson'])} | "
            f"{_fmt(r['spearman'])} |" for m, r in n["methods"].items()]
    if e["skipped"]:
        edge_text = f"Edges skipped: {e['skipped']}"
    else:
        ref = e["edge_reference"]
        for name, s in e["sets"].items():
            rows += [f"| edges, {name} ({s['n_edges']}) | {m} | {_fmt(r['roc_auc']['top_k'])} | "
                     f"{_fmt(r['roc_auc']['threshold'])} | {_fmt(r['pearson'])} | {_fmt(r['spearman'])} |"
                     for m, r in s["methods"].items()]
        edge_text = (f"Edges: exact effect of removing each edge alone on {ref['n_prompts']} prompts: every edge of "
                     f"the restricted graph {ref['config']['restriction']} ({ref['n_edges_restricted']:,} edges) and "
                     f"{ref['n_edges_sampled']:,} of {ref['n_edges_full']:,} full-graph edges "
                     "sampled by receiver layer "
                     f"(seed {ref['sampling']['seed']}); {ref['n_forward']} forwards, {ref['seconds']:.1f} s "
                     f"(`edge_reference.parquet`). Scores: "
                     + "; ".join(f"{m}: {s}" for m, s in e["scores_source"].items()))
    pos = doc["positives_definition"]
    return "\n".join([
        f"# Methods vs exact patching: {model_name} × {task}", "",
        (f"ROC AUC of |method score| against the exact reference (`auc.json`, `roc.png`). Positives, "
         f"top-k: {pos['top_k']}; threshold: {pos['threshold']}."), "",
        "| items | method | AUC top-k | AUC threshold | Pearson | Spearman |", "|---|---|---|---|---|---|",
        *rows, "", "n/a: the positives definition leaves no positive or no negative (counts in `auc.json`).", "",
        f"Nodes: the attribute rule's scores (`{Path(n['source']).name}`, {n['n_prompts']} prompts).", "",
        edge_text, ""])


def reference(cfg: ReferenceConfig | Mapping[str, Any], *, model_cfg: dict, dataset: Path, node_scores: Path,
                  node_prompts: Path,
                  edge_reference: Path, auc: Path, roc: Path, summary: Path, circuit: Path | None = None,
                  edge_scores: Path | None = None, task: str = "task", model: Any = None) -> dict:
    """Stage function of rule ``reference`` (steps 1-4 of the module docstring)."""
    rcfg = ReferenceConfig.from_dict(cfg)
    nodes, node_vec = node_part(Path(node_scores), Path(node_prompts), rcfg)
    edges, edge_vec = edge_part(Path(edge_reference), rcfg, model_cfg, Path(dataset),
                                Path(circuit) if circuit else None, Path(edge_scores) if edge_scores else None, model)
    p = rcfg.positives
    doc = {"schema_version": SCHEMA_VERSION, "model": model_cfg.get("name"), "task": task,
           "config": rcfg.to_dict(), "config_hash": rcfg.hash(),
           "positives_definition": {
               "top_k": f"k = ceil({p.top_fraction} x n) items of largest |exact effect| per item set",
               "threshold": f"|exact effect| > {p.threshold} x |m(N) - m(empty)| (nodes: attribute's mean "
                            "clean minus corrupted metric; edges: full model minus fully patched model)",
               "scores": "methods ranked by |score|; AUC = Mann-Whitney U / (n_pos n_neg), ties 1/2"},
           "nodes": nodes, "edges": edges}
    doc["hash"] = canonical_hash(doc)
    write_document(auc, AucDocument, doc)
    _plot(Path(roc), node_vec, edge_vec, edges["skipped"],
          f"{model_cfg.get('name')} × {task}: ROC vs exact patching (solid: top-k positives, dashed: threshold)")
    atomic_write_text(summary, _markdown(doc, str(model_cfg.get("name")), task))
    out = {f"node_{m}_auc_top_k": r["roc_auc"]["top_k"] for m, r in nodes["methods"].items()}
    for name, s in (edges.get("sets") or {}).items():
        out.update({f"edge_{name}_{m}_auc_top_k": r["roc_auc"]["top_k"] for m, r in s["methods"].items()})
    return {k: v for k, v in out.items() if v is not None}
