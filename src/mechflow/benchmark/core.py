"""``run_acdc``: the ACDC stage (one tau sweep on one task dataset; edge sets per tau on disk).

Steps:
1. Validate the config; load the model and the prepared task dataset (``prepare_task``).
2. Take the first ``n_prompts`` pairs of the largest equal-length bucket (ACDC evaluates one batch).
3. Build the edge restriction; run ACDC for every tau (`mechflow.benchmark.acdc`).
4. Evaluate every circuit exactly with the task metric (MIB normalised faithfulness, edges outside
   the restriction present).
5. Write ``acdc_steps.parquet`` (every decision) and then ``acdc.json`` (edge sets per tau, counts,
   timings), each atomically; ``acdc.json`` is written last and marks completion. Layouts:
   `mechflow.contracts.parquet.ACDC_STEPS_SCHEMA`, `mechflow.contracts.benchmark.AcdcDocument`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mechflow.benchmark.acdc import Acdc, AcdcRun
from mechflow.benchmark.config import BenchmarkConfig
from mechflow.benchmark.restriction import EdgeRestriction
from mechflow.circuits.faithfulness import CircuitEvaluator
from mechflow.circuits.graph import EdgeGraph
from mechflow.contracts.benchmark import AcdcDocument
from mechflow.contracts.documents import write_document
from mechflow.contracts.parquet import ACDC_STEPS_SCHEMA, check_schema
from mechflow.contracts.versions import SCHEMA_VERSION
from mechflow.errors import DataError
from mechflow.io import atomic_path, outputs_in, sha256_file
from mechflow.tasks import select_batch
from mechflow.tasks.dataset import TaskDataset

log = logging.getLogger(__name__)

ACDC_JSON, ACDC_STEPS = "acdc.json", "acdc_steps.parquet"


def load_task_batch(model_cfg: dict, dataset: Path, n_prompts: int, model: Any = None):
    """The model (given or loaded), the task dataset, and its first `n_prompts` equal-length pairs.

    Raises DataError when the dataset was tokenized for another model.
    """
    from mechflow.models import load_model_from_cfg

    loaded = model if model is not None else load_model_from_cfg(model_cfg)
    ds = TaskDataset.load(dataset)
    tok_model = ds.meta.get("tokenizer", {}).get("model")
    if tok_model != loaded.card.name:
        raise DataError(f"{dataset} was tokenized for model {tok_model!r}, not {loaded.card.name!r}; "
                        "re-run prepare_task with the same model config")
    return loaded, ds, select_batch(ds, n_prompts, dataset)


def acdc_outputs(folder: str | Path) -> dict[str, Path]:
    """`run_acdc`'s output paths under their default names in one folder (library callers, tests)."""
    return outputs_in(folder, {"acdc": ACDC_JSON, "steps": ACDC_STEPS})


def run_acdc(cfg: BenchmarkConfig | Mapping[str, Any], *, model_cfg: dict, dataset: Path, acdc: Path, steps: Path,
             model: Any = None) -> dict:
    """Run steps 1-5; returns the ``acdc.json`` document.

    Args:
        cfg: the ``benchmark`` config group (`BenchmarkConfig`).
        model_cfg: the resolved ``model`` group.
        dataset: ``dataset.jsonl`` written by ``prepare_task`` for this model.
        acdc, steps: where ``acdc.json`` and ``acdc_steps.parquet`` go (`acdc_outputs(folder)`).
        model: an already-loaded `LoadedModel` (default: load from ``model_cfg``).
    """
    bench = BenchmarkConfig.from_dict(cfg)
    dataset, acdc_json, steps_path = Path(dataset), Path(acdc), Path(steps)
    loaded, ds, batch = load_task_batch(model_cfg, dataset, bench.n_prompts, model)
    graph = EdgeGraph.from_cfg(loaded.model.cfg)
    restriction = EdgeRestriction.build(graph, bench.restriction)
    runs = Acdc(loaded.model, batch, bench.acdc, restriction).sweep(bench.acdc.thresholds)
    evaluator = CircuitEvaluator(loaded.model, batch, graph)
    doc = {
        "schema_version": SCHEMA_VERSION, "model": model_cfg, "task": ds.name, "config": bench.to_dict(),
        "config_hash": bench.hash(), "dataset_sha256": sha256_file(dataset), "prompt_ids": batch.example_ids,
        "n_prompts": len(batch), "n_pos": int(batch.clean_tokens.shape[1]), "n_edges_total": graph.n_edges,
        "n_edges_restricted": restriction.n_edges, "metric": bench.acdc.metric,
        "task_metric": {"kind": ds.metric_kind, "m_full": evaluator.m_full, "m_empty": evaluator.m_empty},
        "runs": [_run_doc(run, graph, restriction, evaluator) for run in runs],
    }
    table = _steps_table(runs, graph)
    check_schema(table.schema, ACDC_STEPS_SCHEMA, ACDC_STEPS)
    with atomic_path(steps_path) as tmp:
        pq.write_table(table, tmp)
    write_document(acdc_json, AcdcDocument, doc)
    return doc


def _run_doc(run: AcdcRun, graph: EdgeGraph, restriction: EdgeRestriction, ev: CircuitEvaluator) -> dict:
    doc = run.summary(graph)
    doc["task_metric"] = ev.metric(restriction.full_kept(run.kept))
    denom = ev.m_full - ev.m_empty
    doc["faithfulness"] = (doc["task_metric"] - ev.m_empty) / denom if denom != 0 else None
    return doc


def _steps_table(runs: list[AcdcRun], graph: EdgeGraph) -> pa.Table:
    rows = [(run.threshold, i, graph.edge_name(s.sender, s.receiver), s.metric_before,
             s.metric_after if s.evaluated else None, s.evaluated, s.removed)
            for run in runs for i, s in enumerate(run.steps)]
    cols = list(zip(*rows)) if rows else [[]] * 7
    return pa.table({
        "threshold": pa.array(cols[0], pa.float64()), "step": pa.array(cols[1], pa.int32()),
        "edge": pa.array(cols[2], pa.string()), "metric_before": pa.array(cols[3], pa.float64()),
        "metric_after": pa.array(cols[4], pa.float64()), "evaluated": pa.array(cols[5], pa.bool_()),
        "removed": pa.array(cols[6], pa.bool_()),
    })
