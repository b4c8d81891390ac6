"""Task stages: ``prepare_task`` (build the token-exact dataset) and ``evaluate_task`` (baseline)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from mechflow.contracts.documents import write_document
from mechflow.contracts.tasks import TaskBaseline
from mechflow.contracts.versions import SCHEMA_VERSION
from mechflow.errors import DataError
from mechflow.io import sha256_file
from mechflow.tasks.baseline import score_dataset, summarize
from mechflow.tasks.common import Built
from mechflow.tasks.config import TaskConfig, parse_task_config
from mechflow.tasks.dataset import TaskDataset, meta_path_of, write_dataset
from mechflow.tasks.factual import build_factual
from mechflow.tasks.greater_than import build_greater_than
from mechflow.tasks.ioi import build_ioi
from mechflow.tasks.jsonl import build_jsonl
from mechflow.tasks.tokenization import TaskTokenizer

log = logging.getLogger(__name__)

BUILDERS: dict[str, Callable[[TaskConfig, TaskTokenizer], Built]] = {
    "ioi": build_ioi,
    "factual_recall": build_factual,
    "greater_than": build_greater_than,
    "jsonl": build_jsonl,
}


def build_task(cfg: dict | TaskConfig, tok: TaskTokenizer) -> Built:
    """Examples of one task for one tokenizer (no files written)."""
    task = parse_task_config(cfg)
    return BUILDERS[task.kind](task, tok)


def prepare_task(cfg: TaskConfig | Mapping[str, Any], *, model_cfg: dict, dataset: Path, tokenizer: Any = None) -> dict:
    """Write ``dataset`` (JSONL) and its ``.meta.json`` sidecar for one task and one model's tokenizer.

    Args:
        cfg: one task entry (``config/task/<name>.yaml``).
        model_cfg: the resolved ``model`` group (name, prepend_bos, bos_token, ...).
        dataset: output path, e.g. ``results/<run>/tasks/<task>/dataset.jsonl``.
        tokenizer: an already-loaded HF tokenizer for ``model_cfg["name"]`` (default: load it).

    Returns:
        The metadata written to the sidecar. A task that cannot be posed with this tokenizer
        still writes an (empty) dataset whose metadata has ``posable: false`` and the reason.
    """
    task = parse_task_config(cfg)
    tok = TaskTokenizer.from_model_cfg(model_cfg, tokenizer)
    built = BUILDERS[task.kind](task, tok)
    n_ctx = model_cfg.get("n_ctx")
    too_long = [it for it in built.items if n_ctx is not None and it.n_tokens > n_ctx]
    if too_long:
        raise DataError(f"task {task.name}: example {too_long[0].id!r} has {too_long[0].n_tokens} tokens, more than "
                        f"the context of {model_cfg.get('name')} (model.n_ctx = {n_ctx}; {len(too_long)} such "
                        "examples); shorten the prompts or drop them from the task file")
    meta = {
        "task": task.name,
        "kind": task.kind,
        "metric": built.metric,
        "config": asdict(task),
        "config_hash": task.hash(),
        "tokenizer": tok.describe(),
        "posable": built.posable,
        "reason": built.reason,
        "details": built.details,
    }
    meta = write_dataset(Path(dataset), built.items, meta)
    log.info("task %s for %s: %d examples (%s)", task.name, tok.model_name, len(built.items),
             "posable" if built.posable else f"NOT posable: {built.reason}")
    return meta


def check_dataset_matches(ds: TaskDataset, task: TaskConfig, card: Any, path: Path) -> None:
    """The dataset was built from this task config and this model's tokenizer/BOS convention."""
    if ds.meta.get("config_hash") != task.hash():
        raise DataError(f"{path} was prepared with a different config of task {task.name!r}; re-run prepare_task")
    tok = ds.meta.get("tokenizer", {})
    expected_bos = card.bos_token_id if card.prepend_bos else None
    found = (tok.get("model"), tok.get("prepend_bos"), tok.get("bos_token_id"))
    if found != (card.name, card.prepend_bos, expected_bos):
        raise DataError(
            f"{path} was tokenized for model {tok.get('model')!r} (prepend_bos={tok.get('prepend_bos')}, BOS id "
            f"{tok.get('bos_token_id')}) but the model is {card.name!r} (prepend_bos={card.prepend_bos}, BOS id "
            f"{expected_bos}); re-run prepare_task with the same model config"
        )


def evaluate_task(cfg: TaskConfig | Mapping[str, Any], *, model_cfg: dict, dataset: Path, baseline: Path,
                  model: Any = None) -> dict:
    """Baseline of the task on the model; writes ``baseline`` (JSON) atomically and returns it.

    Args:
        cfg: the task entry the dataset was prepared with.
        model_cfg: the resolved ``model`` group.
        dataset: the ``dataset.jsonl`` written by :func:`prepare_task`.
        baseline: output path, e.g. ``.../baseline.json``.
        model: an already-loaded :class:`~mechflow.models.LoadedModel` (default: load from `model_cfg`).
    """
    from mechflow.models import load_model_from_cfg

    task = parse_task_config(cfg)
    dataset = Path(dataset)
    ds = TaskDataset.load(dataset)
    loaded = model if model is not None else load_model_from_cfg(model_cfg)
    check_dataset_matches(ds, task, loaded.card, dataset)
    scores = score_dataset(loaded.model, ds, batch_size=task.batch_size)
    summary = summarize(ds, scores)
    result = {
        "schema_version": SCHEMA_VERSION,
        "task": task.name,
        "kind": task.kind,
        "metric": ds.metric_kind,
        "model": loaded.card.name,
        "config_hash": task.hash(),
        "dataset_sha256": sha256_file(dataset),
        "meta_sha256": sha256_file(meta_path_of(dataset)),
        **summary,
        "per_prompt": [
            {"id": i, "clean": c, "corrupted": k} for i, c, k in zip(scores.example_ids, scores.clean, scores.corrupted)
        ],
    }
    write_document(baseline, TaskBaseline, result)
    log.info("baseline %s on %s: accuracy %s (chance %s), clean %s, corrupted %s -> %s", task.name,
             loaded.card.name, result["accuracy"], result["chance_accuracy"], result["clean_metric_mean"],
             result["corrupted_metric_mean"], result["verdict"])
    return result
