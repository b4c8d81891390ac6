"""The exact edge reference (rule ``edge_reference``): each edge removed ALONE, everything else intact.

Steps:

1. Take the first ``n_prompts`` pairs of the task's largest equal-length bucket.
2. Edge set = every edge of the restricted graph (`mechflow.benchmark.restriction.EdgeRestriction`,
   the benchmark's restriction keys) united with a layer-stratified, seeded sample of the FULL
   graph (`mechflow.reference.sampling`).
3. Exact effect ``m(N without e) - m(N)`` (prompt-mean task metric) of every edge of the set by
   `mechflow.benchmark.evaluation.exhaustive_effects` (edges into one receiver share a batched forward
   started from the cached clean state at the receiver's stage), one call per receiver layer so
   progress and per-layer time are visible.
4. Write ``edge_reference.parquet`` (`mechflow.contracts.parquet.EDGE_REFERENCE_SCHEMA`; its footer
   holds the run document under `META_KEY`: prompts, m(N), m(empty), sampling, timings;
   `mechflow.contracts.reference.EdgeReferenceDocument`) atomically.

Models on which edges are not defined (Gemma-3's post-norms: `check_edge_model`, or
``model.edge_circuits: false``) get an empty table whose footer records the reason; no forward runs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechflow.attribution.patching import PairBatch
from mechflow.benchmark.config import RestrictionConfig
from mechflow.benchmark.evaluation import exhaustive_effects
from mechflow.benchmark.restriction import EdgeRestriction
from mechflow.circuits.core import edges_undefined
from mechflow.circuits.graph import EdgeGraph
from mechflow.contracts.documents import check_document
from mechflow.contracts.parquet import EDGE_REFERENCE_SCHEMA
from mechflow.contracts.reference import EDGE_REFERENCE_META_KEY, EdgeReferenceDocument
from mechflow.contracts.versions import SCHEMA_VERSION
from mechflow.errors import ConfigError, DataError
from mechflow.io import atomic_path, canonical_hash
from mechflow.models.config import ModelConfig
from mechflow.reference.config import ReferenceConfig
from mechflow.reference.sampling import receiver_layers, stratified_sample

log = logging.getLogger(__name__)

META_KEY = EDGE_REFERENCE_META_KEY


def prompts_hash(batch: PairBatch, ids: list[str]) -> str:
    return canonical_hash({"clean": batch.clean_tokens.tolist(), "corrupted": batch.corrupted_tokens.tolist(),
                           "ids": ids})


def edge_sets(graph: EdgeGraph, cfg: ReferenceConfig) -> tuple[Tensor, Tensor, list[dict]]:
    """Restricted mask, sampled mask and the sample's strata (step 2)."""
    spec = cfg.restriction
    try:
        restricted = EdgeRestriction.build(graph, spec).mask
    except ConfigError as e:
        raise ConfigError(str(e).replace("benchmark.restriction", "reference.restriction")) from None
    sampled, strata = stratified_sample(graph, cfg.n_sampled_edges, cfg.min_per_layer, cfg.seed)
    return restricted, sampled, strata


@torch.no_grad()
def exact_edge_effects(model, batch: PairBatch, graph: EdgeGraph, mask: Tensor, max_batch_rows: int = 256,
                       progress: bool = True) -> tuple[Tensor, float, int, list[dict]]:
    """Step 3: exact single-edge effects of every edge in ``mask`` (NaN elsewhere).

    Returns effects ``[n_senders, n_receivers]``, m(N), forwards run (caching ones included), and
    per receiver layer ``{layer, n_edges, seconds, n_forward}``.
    """
    layer_of = receiver_layers(graph)
    effects = torch.full(graph.valid.shape, float("nan"), dtype=torch.float64)
    m_full, n_forward, per_layer = float("nan"), 0, []
    layers = [L for L in range(graph.n_layers + 1) if (mask & (layer_of == L)[None, :]).any()]
    for L in tqdm(layers, desc="exact edge effects (receiver layers)", disable=not progress):
        sub = mask & graph.valid & (layer_of == L)[None, :]
        t0 = time.perf_counter()
        eff, m_full, n_fwd = exhaustive_effects(model, batch, EdgeRestriction(graph, sub, RestrictionConfig()),
                                                max_batch_rows)
        effects[sub] = eff[sub]
        n_forward += n_fwd + 2  # + corrupted recording and clean caching forwards
        per_layer.append({"layer": L, "n_edges": int(sub.sum()), "seconds": time.perf_counter() - t0,
                          "n_forward": n_fwd + 2})
    return effects, m_full, n_forward, per_layer


def _table(graph: EdgeGraph, restricted: Tensor, sampled: Tensor, strata: list[dict], effects: Tensor,
           cfg_hash: str, p_hash: str) -> pa.Table:
    union = (restricted | sampled) & graph.valid
    idx = union.T.nonzero().tolist()  # receiver-major: a receiver's edges are contiguous
    layer_of = receiver_layers(graph).tolist()
    weight = {s["layer"]: s["weight"] for s in strata}
    rows = [(graph.edge_name(s, r), graph.sender_names[s], graph.receiver_names[r], layer_of[r],
             bool(restricted[s, r]), bool(sampled[s, r]), weight[layer_of[r]] if sampled[s, r] else None,
             float(effects[s, r])) for r, s in idx]
    cols = list(zip(*rows)) if rows else [[]] * 8
    columns = [pa.array(c, f.type) for c, f in zip(cols, EDGE_REFERENCE_SCHEMA)]
    return pa.table([*columns, pa.array([cfg_hash] * len(rows)), pa.array([p_hash] * len(rows))],
                    schema=EDGE_REFERENCE_SCHEMA)


def write_edge_reference(path: Path, table: pa.Table, doc: dict) -> None:
    doc = check_document(EdgeReferenceDocument, doc)
    table = table.replace_schema_metadata({META_KEY: json.dumps(doc, default=str).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_edge_reference(path: Path) -> tuple[pa.Table, dict]:
    """The table and its footer document; DataError when the file is not an edge reference."""
    try:
        table = pq.read_table(path)
        doc = json.loads(table.schema.metadata[META_KEY])
    except Exception as exc:  # missing file, not Parquet, or no footer document
        raise DataError(f"{path}: not an edge_reference.parquet ({exc}); re-run rule edge_reference") from exc
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{path}: schema_version {doc.get('schema_version')!r}, expected {SCHEMA_VERSION!r}; "
                        "re-run rule edge_reference")
    try:
        check_document(EdgeReferenceDocument, doc)
    except ValueError as exc:
        raise DataError(f"{path}: its footer is not an edge reference document ({exc}); "
                        "re-run rule edge_reference") from exc
    return table.replace_schema_metadata(None), doc


def edge_support(model_cfg: ModelConfig | Mapping[str, Any], model=None) -> str | None:
    """None when edges are defined for the model, else the reason (`mechflow.circuits.edges_undefined`)."""
    return edges_undefined(model_cfg, model, instead="reference")


def edge_reference(cfg: ReferenceConfig | Mapping[str, Any], *, model_cfg: ModelConfig | Mapping[str, Any],
                       dataset: Path,
                       edge_reference: Path,
                       task: str = "task", model: Any = None) -> dict:
    """Stage function of rule ``edge_reference`` (steps 1-4 of the module docstring)."""
    rcfg = ReferenceConfig.from_dict(cfg)
    doc = {"schema_version": SCHEMA_VERSION, "model": ModelConfig.from_dict(model_cfg).name, "task": task,
           "config": rcfg.exact_dict(), "config_hash": rcfg.exact_hash(), "skipped": edge_support(model_cfg)}
    if doc["skipped"] is None:
        from mechflow.benchmark.core import load_task_batch

        loaded, _, batch = load_task_batch(model_cfg, Path(dataset), rcfg.n_prompts, model)
        doc["skipped"] = edge_support(model_cfg, loaded.model)
    if doc["skipped"] is not None:
        log.warning("edge reference skipped: %s", doc["skipped"])
        write_edge_reference(edge_reference, EDGE_REFERENCE_SCHEMA.empty_table(), doc)
        return {"n_edges": 0}

    graph = EdgeGraph.from_cfg(loaded.model.cfg)
    ids = [str(i) for i in batch.example_ids]
    restricted, sampled, strata = edge_sets(graph, rcfg)
    t0 = time.perf_counter()
    effects, m_full, n_forward, per_layer = exact_edge_effects(loaded.model, batch, graph, restricted | sampled,
                                                               rcfg.max_batch_rows)
    seconds = time.perf_counter() - t0
    with torch.no_grad():  # every edge removed = the corrupted run
        m_empty = float(batch.metric(loaded.model(batch.corrupted_tokens)).double().mean())
    p_hash = prompts_hash(batch, ids)
    doc.update({
        "n_prompts": len(ids), "n_pos": int(batch.clean_tokens.shape[1]), "prompt_ids": ids, "prompts_hash": p_hash,
        "m_full": m_full, "m_empty": m_empty, "n_edges_full": graph.n_edges,
        "n_edges_restricted": int(restricted.sum()), "n_edges_sampled": int(sampled.sum()),
        "n_edges_evaluated": int((restricted | sampled).sum()),
        "sampling": {"rule": "stratified by receiver layer (logits = layer n_layers); per stratum "
                             "min(min_per_layer, size) edges, the rest proportional to size (largest "
                             "remainder); without replacement, numpy default_rng(seed), strata in layer order",
                     "seed": rcfg.seed, "n_requested": rcfg.n_sampled_edges, "min_per_layer": rcfg.min_per_layer,
                     "strata": strata},
        "seconds": seconds, "n_forward": n_forward, "per_layer": per_layer,
        "effect": "m(N without e) - m(N): the edge's receiver reads the corrupted sender output, "
                  "everything downstream recomputed; task metric mean over prompts",
    })
    write_edge_reference(edge_reference, _table(graph, restricted, sampled, strata, effects, doc["config_hash"],
                                                p_hash), doc)
    log.info("edge reference: %d edges in %.1f s (%d forwards)", doc["n_edges_evaluated"], seconds, n_forward)
    return {"n_edges": doc["n_edges_evaluated"], "seconds": seconds}
