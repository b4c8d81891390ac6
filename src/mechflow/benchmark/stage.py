"""`benchmark`: the stage function of rule ``benchmark`` (ACDC vs EAP, EAP-IG, our circuit search and
exhaustive patching on one restricted edge graph; `mechflow.benchmark.compare`).

Steps:

1. The config arrives validated (`BenchmarkConfig`, group ``benchmark``); load the model and the
   first ``n_prompts`` pairs of the largest equal-length bucket of the task dataset.
2. Compare the methods on that batch and write the files (`compare_methods`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mechflow.benchmark.compare import compare_methods
from mechflow.benchmark.config import BenchmarkConfig
from mechflow.benchmark.core import load_task_batch
from mechflow.errors import DataError


def benchmark(cfg: BenchmarkConfig | Mapping[str, Any], *, model_cfg: dict, dataset: Path, table: Path,
              table_tex: Path, timings: Path, summary: Path, roc: Path, curves: Path, model: Any = None) -> dict:
    """Run steps 1-2; returns the ``timings.json`` document.

    Args:
        cfg: the ``benchmark`` config group (a mapping is validated by `BenchmarkConfig` first).
        model_cfg: the resolved ``model`` group.
        dataset: ``dataset.jsonl`` written by ``prepare_task`` for this model.
        table, table_tex, timings, summary, roc, curves: the paths written (folders created):
            ``table.csv``, ``table.tex``, ``timings.json``, ``benchmark.md``, ``roc.png``,
            ``faithfulness_curves.png``; `benchmark_outputs(folder)` gives these names in one folder.
        model: an already-loaded `LoadedModel` (default: load from ``model_cfg``).
    """
    bench = BenchmarkConfig.from_dict(cfg)
    dataset = Path(dataset)
    loaded, ds, batch = load_task_batch(model_cfg, dataset, bench.n_prompts, model)
    meta = {"model": model_cfg, "task": ds.name, "prompt_ids": list(batch.example_ids)}
    try:
        return compare_methods(loaded.model, batch, bench, table=table, table_tex=table_tex, timings=timings,
                               summary=summary, roc=roc, curves=curves, meta=meta)
    except ValueError as e:
        if "faithfulness is undefined" in str(e):
            raise DataError(f"{dataset}: {e}") from None
        raise
