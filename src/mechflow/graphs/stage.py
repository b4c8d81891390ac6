"""Rule `attribution_graph`: the attribution graph of one task prompt, with everything people open.

For prompt ``prompt`` (a row of the task's ``dataset.jsonl``) on the run's transcoder set:

1. the unpruned graph (`mechflow.graphs.attribution.attribute_prompt`), saved as safetensors;
2. pruning, replacement and completeness scores of the unpruned and pruned graph, and the error
   nodes' share of influence per layer (`mechflow.graphs.influence`);
3. the pruned graph as Neuronpedia / circuit-tracer frontend JSON with supernodes
   (`mechflow.graphs.export`), the offline HTML viewer (`mechflow.graphs.viewer`) with each kept
   feature's top activating corpus contexts and logit effects, and a static figure;
4. validation by intervention in the real model (`mechflow.graphs.validation`).

Rule `graphs_summary` then writes the task's ``graphs.md`` and the frontend's ``graph-metadata.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mechflow.contracts.documents import load_document, write_document
from mechflow.contracts.graphs import GraphSummary, SupernodesDocument
from mechflow.contracts.tasks import TaskDatasetRow
from mechflow.errors import ConfigError, DataError
from mechflow.graphs.attribution import AttributionGraph, attribute_prompt
from mechflow.graphs.config import GraphConfig
from mechflow.graphs.export import neuronpedia_graph, save_graph, supernodes, write_graph_json
from mechflow.graphs.figures import plot_graph, plot_validation
from mechflow.graphs.influence import graph_scores, influence, logit_weights, normalize_matrix, prune_graph
from mechflow.graphs.replacement import TranscoderSet, setup_prompt
from mechflow.graphs.validation import validate_graph
from mechflow.graphs.viewer import write_viewer
from mechflow.io import atomic_write_text

log = logging.getLogger(__name__)


def slug_of(task: str, prompt: int) -> str:
    return f"{task}-p{int(prompt)}"


def read_prompt(dataset: Path, prompt: int) -> dict:
    rows = [json.loads(line) for line in Path(dataset).read_text().splitlines() if line.strip()]
    if not 0 <= prompt < len(rows):
        raise ConfigError(f"graph.prompts: prompt {prompt} is not a row of {dataset} ({len(rows)} rows); "
                          f"choose indices in [0, {len(rows) - 1}]")
    row = rows[prompt]
    TaskDatasetRow.model_validate(row)
    return row


def pruned_adjacency(graph: AttributionGraph, node_mask: torch.Tensor, edge_mask: torch.Tensor) -> torch.Tensor:
    keep = edge_mask & node_mask[:, None] & node_mask[None, :]
    return graph.adjacency * keep


def error_share_per_layer(graph: AttributionGraph) -> list[float]:
    """Each layer's error nodes' share of the total influence on the logits (unpruned graph)."""
    layout = graph.layout
    w = logit_weights(layout, graph.logit_probabilities)
    scores = influence(normalize_matrix(graph.adjacency.double()), w)
    total = float(scores[: layout.logits.start].sum())
    errors = scores[layout.errors].reshape(graph.n_layers, graph.n_pos).sum(1)
    return [float(e) / total if total > 0 else 0.0 for e in errors]


def node_label(graph: AttributionGraph, idx: int, decode) -> str:
    layout = graph.layout
    if idx < layout.n_features:
        layer, pos, f = graph.active_features[int(graph.selected_features[idx])].tolist()
        return f"L{layer} F{f} @{pos}"
    if idx < layout.tokens.start:
        layer, pos = divmod(idx - layout.n_features, graph.n_pos)
        return f"error L{layer} @{pos}"
    if idx < layout.logits.start:
        pos = idx - layout.tokens.start
        return f"token {decode(int(graph.tokens[pos]))!r} @{pos}"
    k = idx - layout.logits.start
    return f"logit {decode(int(graph.logit_tokens[k]))!r}"


def top_paths(graph: AttributionGraph, kept: torch.Tensor, target: int, n_paths: int = 3,
              max_len: int = 12) -> list[list[int]]:
    """Greedy strongest paths into ``target`` through the kept edges: start at each of its
    ``n_paths`` strongest inputs and follow the strongest kept input back to a token or error node."""
    A = graph.adjacency * kept
    layout = graph.layout
    first = torch.argsort(A[target].abs(), descending=True)[:n_paths]
    paths = []
    for start in first.tolist():
        if A[target, start] == 0:
            continue
        path = [target, start]
        node = start
        while node < layout.n_features and len(path) < max_len:
            nxt = int(A[node].abs().argmax())
            if A[node, nxt] == 0:
                break
            path.append(nxt)
            node = nxt
        paths.append(path[::-1])
    return paths


def feature_details(model, transcoders: TranscoderSet, keys: list[tuple[int, int]], tokens_path: Path | None,
                    top_contexts: Path | None, cfg: GraphConfig, decode) -> dict[str, Any]:
    """Top activating corpus contexts (from the `transcoder_features` stage's `top_contexts.parquet`,
    windows read from the corpus `tokens_path`) and logit effects (``W_dec W_U``, before the final
    norm's scale) of the kept features, keyed ``"{layer}_{feature}"`` for the viewer."""
    details: dict[str, Any] = {}
    W_U = model.W_U.detach()
    for layer, f in keys:
        effects = transcoders.transcoders[layer].W_dec[f].to(W_U.dtype) @ W_U
        top = torch.topk(effects, cfg.viewer_logit_effects)
        bottom = torch.topk(-effects, cfg.viewer_logit_effects)
        details[f"{layer}_{f}"] = {
            "top_contexts": [],
            "logit_effects": {"top": [{"token": decode(int(i)), "value": float(v)} for v, i in zip(*top, strict=True)],
                              "bottom": [{"token": decode(int(i)), "value": -float(v)}
                                         for v, i in zip(*bottom, strict=True)]}}
    if not keys or cfg.viewer_top_contexts == 0 or tokens_path is None or top_contexts is None:
        return details
    import polars as pl

    from mechflow.contracts.parquet import TRANSCODER_TOP_CONTEXTS_SCHEMA, check_schema
    from mechflow.corpus.core import read_contexts

    table = pl.scan_parquet(top_contexts)
    check_schema(table.head(0).collect().to_arrow().schema, TRANSCODER_TOP_CONTEXTS_SCHEMA, str(top_contexts))
    wanted = pl.DataFrame({"layer": [k[0] for k in keys], "feature": [k[1] for k in keys]},
                          schema={"layer": pl.Int32, "feature": pl.Int32})
    rows = (table.join(wanted.lazy(), on=["layer", "feature"]).filter(pl.col("rank") < cfg.viewer_top_contexts)
            .sort(["layer", "feature", "rank"]).collect())
    contexts = read_contexts(Path(tokens_path))
    if len(rows) and int(rows["context_id"].max()) >= len(contexts):
        raise DataError(f"{top_contexts} names context {int(rows['context_id'].max())} but the corpus {tokens_path} "
                        f"has {len(contexts)}: re-run transcoder_features on this corpus")
    w = cfg.viewer_window
    for r in rows.iter_rows(named=True):
        ids, p = contexts[r["context_id"]].tolist(), r["position"]
        details[f"{r['layer']}_{r['feature']}"]["top_contexts"].append(
            {"activation": float(r["activation"]), "context": r["context_id"], "position": p, "token": decode(ids[p]),
             "left": [decode(t) for t in ids[max(0, p - w):p]], "right": [decode(t) for t in ids[p + 1:p + 1 + w]]})
    return details


def attribution_graph(cfg: GraphConfig | Mapping[str, Any], *, transcoder_set: Path, dataset: Path,
                      tokens: Path | None, top_contexts: Path | None,
                      graph: Path, summary: Path, neuronpedia: Path, viewer: Path, figure: Path, validation: Path,
                      validation_figure: Path, supernodes_file: Path, task: str, prompt: int | str,
                      model_cfg: dict, loaded_model: Any = None) -> dict[str, Any]:
    """Build, prune, export, show and validate the graph of one task prompt (module docstring)."""
    from mechflow.contracts.dictionaries import TranscoderSetDocument

    gcfg = GraphConfig.from_dict(cfg)
    prompt = int(prompt)
    t0 = time.perf_counter()
    if loaded_model is None:
        from mechflow.models import load_model_from_cfg

        loaded_model = load_model_from_cfg(model_cfg)
    model, tokenizer = loaded_model.model, loaded_model.tokenizer

    def decode(token_id: int) -> str:
        return tokenizer.decode([int(token_id)])

    set_doc = load_document(transcoder_set, TranscoderSetDocument, fix="re-run transcoder_set")
    transcoders = TranscoderSet.from_folders([Path(f) for f in set_doc["folders"]]).to(model.cfg.dtype)
    row = read_prompt(Path(dataset), prompt)
    ids = torch.tensor(row["clean_ids"])
    answer, foil = int(row["answer_id"]), int(row["wrong_id"])
    include = [answer, foil] if gcfg.include_answer_logits else []
    bos = getattr(tokenizer, "bos_token_id", None)
    if loaded_model.card.bos_token_id is not None:
        bos = loaded_model.card.bos_token_id
    built = attribute_prompt(model, transcoders, ids, max_n_logits=gcfg.max_n_logits,
                             desired_logit_prob=gcfg.desired_logit_prob, batch_size=gcfg.batch_size,
                             max_feature_nodes=gcfg.max_feature_nodes, update_interval=gcfg.update_interval,
                             zero_bos=gcfg.zero_bos, bos_token_id=bos, max_tokens=gcfg.max_tokens,
                             include_logits=include, progress=True)
    seconds_graph = time.perf_counter() - t0
    layout = built.layout
    pruned = prune_graph(built.adjacency, layout, built.logit_probabilities, node_threshold=gcfg.node_threshold,
                         edge_threshold=gcfg.edge_threshold)
    kept = pruned.edge_mask & pruned.node_mask[:, None] & pruned.node_mask[None, :]
    rep, comp = graph_scores(built.adjacency, layout, built.logit_probabilities)
    rep_p, comp_p = graph_scores(pruned_adjacency(built, pruned.node_mask, pruned.edge_mask), layout,
                                 built.logit_probabilities)
    slug = slug_of(task, prompt)
    save_graph(graph, built, {"slug": slug, "prompt": row["prompt"]})
    kept_features = [(int(built.active_features[int(built.selected_features[i])][0]),
                      int(built.active_features[int(built.selected_features[i])][2]))
                     for i in pruned.node_mask.nonzero().flatten().tolist() if i < layout.n_features]
    groups = supernodes(built, pruned, lambda layer, f: transcoders.transcoders[layer].W_dec[f],
                        gcfg.supernode_min_cosine)
    write_document(supernodes_file, SupernodesDocument, {"slug": slug, "min_cosine": gcfg.supernode_min_cosine,
                                                         "supernodes": groups})
    doc = neuronpedia_graph(built, pruned, slug=slug, scan=f"mechflow-{model.cfg.model_name}-transcoder_set",
                            transcoder_list=[str(f) for f in set_doc["folders"]], decode=decode,
                            prompt=row["prompt"], node_threshold=gcfg.node_threshold, supernodes=groups)
    write_graph_json(neuronpedia, doc)
    details = feature_details(model, transcoders, sorted(set(kept_features)), tokens, top_contexts, gcfg,
                              decode)
    write_viewer(viewer, doc, features=details, title=f"{task} prompt {prompt}: {row['prompt']}",
                 scores={"replacement": rep_p, "completeness": comp_p})
    plot_graph(doc, figure, title=f"{slug}: replacement {rep_p:.2f}, completeness {comp_p:.2f} (pruned)")
    rows, vsummary = [], {"n_interventions": 0}
    if gcfg.validation_features > 0:
        state = setup_prompt(model, transcoders, ids, zero_bos=gcfg.zero_bos, bos_token_id=bos)
        rows, vsummary = validate_graph(model, transcoders, built, state, answer=answer, foil=foil,
                                        n_features=gcfg.validation_features,
                                        operations=list(gcfg.validation_operations),
                                        exclude_positions=list(gcfg.validation_exclude_positions))
    _write_validation(validation, rows)
    plot_validation(rows, validation_figure, title=slug)
    answer_node = layout.logits.start + int((built.logit_tokens == answer).nonzero()[0]) \
        if (built.logit_tokens == answer).any() else layout.logits.start
    paths = [[node_label(built, i, decode) for i in p] for p in top_paths(built, kept, answer_node)]
    result = {
        "stage": "attribution_graph", "task": task, "prompt_index": prompt, "slug": slug, "prompt": row["prompt"],
        "tokens": [decode(t) for t in ids.tolist()], "answer": row["answer"], "foil": row["wrong_answer"],
        "answer_id": answer, "foil_id": foil,
        "logits": [{"token": decode(int(t)), "token_id": int(t), "probability": float(p)}
                   for t, p in zip(built.logit_tokens, built.logit_probabilities, strict=True)],
        "n_active_features": int(built.active_features.shape[0]), "n_feature_nodes": layout.n_features,
        "n_error_nodes": layout.n_errors, "n_token_nodes": layout.n_tokens, "n_logit_nodes": layout.n_logits,
        "n_edges": int((built.adjacency != 0).sum()),
        "pruned": {"n_nodes": int(pruned.node_mask.sum()), "n_feature_nodes": len(kept_features),
                   "n_edges": int(kept.sum()), "node_threshold": gcfg.node_threshold,
                   "edge_threshold": gcfg.edge_threshold},
        "scores": {"replacement": rep, "completeness": comp, "replacement_pruned": rep_p,
                   "completeness_pruned": comp_p},
        "error_share_per_layer": error_share_per_layer(built),
        "top_paths": paths, "validation": vsummary, "bos_zeroed": bool(gcfg.zero_bos and bos is not None
                                                                       and int(ids[0]) == int(bos)),
        "seconds": {"graph": round(seconds_graph, 3), "total": round(time.perf_counter() - t0, 3)},
        "config": dataclasses.asdict(gcfg),
        "files": {"graph": str(graph), "neuronpedia": str(neuronpedia), "viewer": str(viewer),
                  "figure": str(figure), "validation": str(validation), "supernodes": str(supernodes_file),
                  "transcoder_set": str(transcoder_set), "dataset": str(dataset)},
    }
    write_document(summary, GraphSummary, result)
    log.info("graph %s: %d feature nodes (%d active), pruned %d nodes / %d edges; replacement %.3f / %.3f, "
             "completeness %.3f / %.3f (unpruned / pruned); %.1f s", slug, layout.n_features,
             result["n_active_features"], result["pruned"]["n_nodes"], result["pruned"]["n_edges"], rep, rep_p,
             comp, comp_p, result["seconds"]["total"])
    return result


def _write_validation(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa

    from mechflow.contracts.parquet import GRAPH_VALIDATION_SCHEMA, write_table

    columns = {f.name: [r.get(f.name) for r in rows] for f in GRAPH_VALIDATION_SCHEMA}
    write_table(pa.Table.from_pydict(columns, schema=GRAPH_VALIDATION_SCHEMA), path, GRAPH_VALIDATION_SCHEMA)


def _validation_lines(v: dict) -> list[str]:
    """graphs.md lines of one graph's validation: real vs graph path sum, per selection and operation."""
    if not v.get("n_interventions"):
        return []

    def fmt(a: dict | None) -> str:
        a = a or {}
        keys = ("pearson", "spearman", "sign_agreement")
        return ", ".join("n/a" if a.get(k) is None else f"{a[k]:.2f}" for k in keys)

    out = ["", "Validation in the real model, graph path sum vs measured change of the answer logit "
           "(Pearson, Spearman, signs right):", "",
           "| features | all operations | " + " | ".join(v.get("operations", [])) + " |",
           "|---|---|" + "---|" * len(v.get("operations", []))]
    blocks = [("top by influence", v)]
    if "excluding_positions" in v:
        blocks.append((f"top outside positions {v['excluding_positions']['positions']}", v["excluding_positions"]))
    for label, block in blocks:
        by_op = block.get("by_operation", {})
        out.append(f"| {label} | {fmt(block.get('real_vs_graph'))} | "
                   + " | ".join(fmt(by_op.get(op)) for op in v.get("operations", [])) + " |")
    return out


def graphs_summary(cfg: GraphConfig | Mapping[str, Any], *, summaries: list[Path], neuronpedia: list[Path],
                   metadata: Path, markdown: Path, task: str) -> dict[str, Any]:
    """The task's ``graph-metadata.json`` (the frontend's index of its graphs) and ``graphs.md``."""
    from mechflow.contracts.graphs import GraphMetadataIndex, NeuronpediaGraph

    docs = [load_document(s, GraphSummary, fix="re-run attribution_graph") for s in summaries]
    if not docs:
        raise DataError(f"no graphs for task {task}: graph.prompts is empty")
    graphs = [load_document(p, NeuronpediaGraph, fix="re-run attribution_graph")["metadata"] for p in neuronpedia]
    write_document(metadata, GraphMetadataIndex, {"graphs": sorted(graphs, key=lambda g: g["slug"])})
    lines = [f"# Attribution graphs: {task}", "",
             "Per-layer transcoder set; scores as circuit-tracer defines them (replacement: share of input-to-output "
             "influence not through error nodes; completeness: influence-weighted share of node inputs that are not "
             "errors). Published anchor: Gemma-2-2B with a cross-layer transcoder on Neuronpedia, pruned graphs "
             "average about 0.53 replacement and 0.83 completeness.", "",
             "| prompt | tokens | feature nodes (active) | pruned nodes / edges | replacement (unpruned / pruned) | "
             "completeness (unpruned / pruned) | validation: real vs graph (Pearson, Spearman, sign) | file |",
             "|---|---|---|---|---|---|---|---|"]
    for d, path in zip(docs, summaries, strict=True):
        v = d["validation"].get("real_vs_graph") or {}
        fmt = (lambda x: "n/a" if x is None else f"{x:.3f}")  # noqa: E731
        lines.append(
            f"| {d['slug']}: {d['prompt']!r} → {d['answer']!r} | {len(d['tokens'])} | {d['n_feature_nodes']} "
            f"({d['n_active_features']}) | {d['pruned']['n_nodes']} / {d['pruned']['n_edges']} | "
            f"{d['scores']['replacement']:.3f} / {d['scores']['replacement_pruned']:.3f} | "
            f"{d['scores']['completeness']:.3f} / {d['scores']['completeness_pruned']:.3f} | "
            f"{fmt(v.get('pearson'))}, {fmt(v.get('spearman'))}, {fmt(v.get('sign_agreement'))} | `{path}` |")
    for d in docs:
        lines += ["", f"## {d['slug']}", "",
                  "Top paths to the answer logit (strongest kept inputs, followed back):", ""]
        lines += [f"- {' → '.join(p)}" for p in d["top_paths"]] or ["- (none kept)"]
        share = d["error_share_per_layer"]
        worst = sorted(range(len(share)), key=lambda i: -share[i])[:5]
        lines += ["", "Error nodes' share of influence, largest layers: "
                  + ", ".join(f"L{i} {share[i]:.3f}" for i in worst)]
        lines += _validation_lines(d["validation"])
    atomic_write_text(markdown, "\n".join(lines) + "\n")
    return {"task": task, "graphs": [d["slug"] for d in docs]}
