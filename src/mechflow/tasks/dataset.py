"""Token-exact task datasets: ``dataset.jsonl`` (one example per line) + ``dataset.meta.json``.

Each JSONL line holds the :class:`~mechflow.contracts.tasks.TaskExample` fields plus the ids the
model sees: ``clean_ids``/``corrupted_ids`` (BOS included per the model convention, always of
equal length so activations can be patched position by position), ``answer_id``/``wrong_id``, and
``good_ids``/``bad_ids``, the token sets the metric contrasts. Dataset-level facts (task config and
its hash, tokenizer, BOS convention, metric, what the filters dropped, whether the task could be
posed at all) live in the sidecar ``dataset.meta.json``. Both layouts are contracts
(`mechflow.contracts.tasks.TaskDatasetRow`, `TaskDatasetMeta`).

Metrics (both read the logits at the final position; both are differentiable):

* ``logit_diff`` (IOI, factual recall, user JSONL; Wang et al. 2022):
  ``logit[answer_id] - logit[wrong_id]``.
* ``prob_diff`` (greater-than; Hanna et al. 2023, "probability difference"):
  ``sum(softmax[good_ids]) - sum(softmax[bad_ids])``.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechflow.contracts.documents import check_document, write_document
from mechflow.contracts.tasks import TaskDatasetMeta, TaskDatasetRow, TaskExample
from mechflow.contracts.versions import SCHEMA_VERSION
from mechflow.errors import DataError, IntegrityError
from mechflow.io import atomic_write_text, sha256_bytes

log = logging.getLogger(__name__)

META_SUFFIX = ".meta.json"
METRICS = ("logit_diff", "prob_diff")


def meta_path_of(dataset: Path) -> Path:
    """``dataset.jsonl`` -> ``dataset.meta.json`` (same folder)."""
    dataset = Path(dataset)
    return dataset.with_name(dataset.name.rsplit(".", 1)[0] + META_SUFFIX)


@dataclass(frozen=True)
class TaskItem:
    """One tokenized example (a row of ``dataset.jsonl``)."""

    id: int | str
    prompt: str
    corrupted_prompt: str
    answer: str
    wrong_answer: str
    template: str | None
    clean_ids: list[int]
    corrupted_ids: list[int]
    answer_id: int
    wrong_id: int
    good_ids: list[int]
    bad_ids: list[int]

    def __post_init__(self) -> None:
        if len(self.clean_ids) != len(self.corrupted_ids):
            raise DataError(f"example {self.id!r}: clean prompt has {len(self.clean_ids)} tokens, corrupted "
                            f"prompt {len(self.corrupted_ids)}; they must be equal for patching")
        if not self.good_ids or not self.bad_ids or set(self.good_ids) & set(self.bad_ids):
            raise DataError(f"example {self.id!r}: good_ids and bad_ids must be non-empty and disjoint")

    @property
    def n_tokens(self) -> int:
        return len(self.clean_ids)

    def example(self) -> TaskExample:
        return TaskExample(id=self.id, prompt=self.prompt, corrupted_prompt=self.corrupted_prompt,
                           answer=self.answer, wrong_answer=self.wrong_answer, template=self.template)

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any], where: str) -> "TaskItem":
        try:
            TaskExample(**{k: row.get(k) for k in TaskExample.model_fields if k in row})
            ints = {k: row[k] for k in ("answer_id", "wrong_id")}
            lists = {k: row[k] for k in ("clean_ids", "corrupted_ids", "good_ids", "bad_ids")}
        except KeyError as exc:
            raise DataError(f"{where}: field {exc.args[0]!r} is missing; re-run the prepare_task stage") from exc
        except Exception as exc:
            raise DataError(f"{where}: not a task example ({exc}); re-run the prepare_task stage") from exc
        if not all(isinstance(v, int) for v in ints.values()) or not all(
            isinstance(v, list) and all(isinstance(i, int) for i in v) for v in lists.values()
        ):
            raise DataError(f"{where}: token id fields must be integers / lists of integers")
        return cls(id=row["id"], prompt=row["prompt"], corrupted_prompt=row["corrupted_prompt"],
                   answer=row["answer"], wrong_answer=row["wrong_answer"], template=row.get("template"),
                   **ints, **lists)


@dataclass
class TaskBatch:
    """Examples of ONE token length, ready for a forward pass.

    Attributes:
        clean_tokens: ``[n, pos]`` clean prompts.
        corrupted_tokens: ``[n, pos]`` corrupted prompts (same length, position-aligned).
        example_ids: the example ids, in row order.
        metric_kind: ``logit_diff`` or ``prob_diff`` (see module docstring).
        answer_ids, wrong_ids: ``[n]`` the answer / wrong-answer token of each prompt.
        target_ids: ``[n, k]`` candidate tokens of the metric (good then bad, padded).
        target_signs: ``[n, k]`` +1 for good, -1 for bad, 0 for padding.
    """

    clean_tokens: Tensor
    corrupted_tokens: Tensor
    example_ids: list
    metric_kind: str
    answer_ids: Tensor
    wrong_ids: Tensor
    target_ids: Tensor
    target_signs: Tensor

    def __len__(self) -> int:
        return self.clean_tokens.shape[0]

    def metric(self, logits: Tensor) -> Tensor:
        """Per-prompt task metric at the last position; differentiable in `logits`.

        Args:
            logits: ``[n, pos, vocab]`` (the final position is used) or ``[n, vocab]``.

        Returns:
            ``[n]``: logit difference, or probability difference for ``prob_diff`` tasks.
        """
        last = logits[:, -1, :] if logits.dim() == 3 else logits
        if last.shape[0] != len(self):
            raise ValueError(f"metric got logits for {last.shape[0]} prompts, batch has {len(self)}")
        values = last.softmax(dim=-1) if self.metric_kind == "prob_diff" else last
        picked = values.gather(-1, self.target_ids.to(last.device))
        return (picked * self.target_signs.to(device=last.device, dtype=last.dtype)).sum(dim=-1)

    def correct(self, logits: Tensor) -> Tensor:
        """``[n]`` bool: answer logit > wrong logit (``logit_diff``), P(good) > P(bad) (``prob_diff``)."""
        return self.metric(logits) > 0

    def to(self, device: torch.device | str) -> "TaskBatch":
        return TaskBatch(self.clean_tokens.to(device), self.corrupted_tokens.to(device), self.example_ids,
                         self.metric_kind, self.answer_ids.to(device), self.wrong_ids.to(device),
                         self.target_ids.to(device), self.target_signs.to(device))


def make_batch(items: list[TaskItem], metric_kind: str) -> TaskBatch:
    """Stack examples of one token length into a :class:`TaskBatch`."""
    lengths = {it.n_tokens for it in items}
    if len(lengths) != 1:
        raise ValueError(f"a TaskBatch needs examples of one token length, got {sorted(lengths)}")
    k = max(len(it.good_ids) + len(it.bad_ids) for it in items)
    target_ids = torch.zeros(len(items), k, dtype=torch.long)
    signs = torch.zeros(len(items), k, dtype=torch.float64)
    for row, it in enumerate(items):
        ids = it.good_ids + it.bad_ids
        target_ids[row, : len(ids)] = torch.tensor(ids)
        target_ids[row, len(ids):] = ids[0]  # padding points at a real token, weighted 0
        signs[row, : len(it.good_ids)] = 1.0
        signs[row, len(it.good_ids): len(ids)] = -1.0
    return TaskBatch(
        clean_tokens=torch.tensor([it.clean_ids for it in items], dtype=torch.long),
        corrupted_tokens=torch.tensor([it.corrupted_ids for it in items], dtype=torch.long),
        example_ids=[it.id for it in items],
        metric_kind=metric_kind,
        answer_ids=torch.tensor([it.answer_id for it in items], dtype=torch.long),
        wrong_ids=torch.tensor([it.wrong_id for it in items], dtype=torch.long),
        target_ids=target_ids,
        target_signs=signs,
    )


def chance_metric(item: TaskItem, metric_kind: str) -> float:
    """Metric of a predictor with no preference among the candidate tokens.

    ``logit_diff``: 0 (equal logits). ``prob_diff``: uniform probability over good ∪ bad, so
    ``(|good| - |bad|) / (|good| + |bad|)`` (mass outside the candidates only shrinks this).
    """
    if metric_kind == "logit_diff":
        return 0.0
    n_good, n_bad = len(item.good_ids), len(item.bad_ids)
    return (n_good - n_bad) / (n_good + n_bad)


def chance_correct(item: TaskItem, metric_kind: str) -> float:
    """Probability that that no-preference predictor counts as correct (ties broken at random)."""
    value = chance_metric(item, metric_kind)
    return 0.5 if value == 0 else float(value > 0)


@dataclass
class TaskDataset:
    """A prepared task: examples plus the sidecar metadata.

    Attributes:
        name: task name (config ``name``).
        kind: ``ioi`` | ``factual_recall`` | ``greater_than`` | ``jsonl``.
        metric_kind: ``logit_diff`` | ``prob_diff``.
        examples: the tokenized examples.
        meta: the sidecar metadata (see :func:`write_dataset`).
    """

    name: str
    kind: str
    metric_kind: str
    examples: list[TaskItem]
    meta: dict = field(default_factory=dict)

    @property
    def posable(self) -> bool:
        """False when the task cannot be posed with this tokenizer (then ``examples`` is empty)."""
        return bool(self.meta.get("posable", True))

    @property
    def reason(self) -> str | None:
        """Why the task cannot be posed (None when it can)."""
        return self.meta.get("reason")

    def buckets(self, max_batch: int | None = None) -> list[TaskBatch]:
        """Batches of equal token length (shortest first), each at most `max_batch` prompts."""
        groups: dict[int, list[TaskItem]] = defaultdict(list)
        for it in self.examples:
            groups[it.n_tokens].append(it)
        out = []
        for length in sorted(groups):
            items = groups[length]
            step = max_batch or len(items)
            out.extend(make_batch(items[i: i + step], self.metric_kind) for i in range(0, len(items), step))
        return out

    @classmethod
    def load(cls, path: Path) -> "TaskDataset":
        """Read ``dataset.jsonl`` and its ``dataset.meta.json``; DataError on anything malformed."""
        path = Path(path)
        meta_path = meta_path_of(path)
        if not path.exists():
            raise DataError(f"{path} does not exist; run the prepare_task stage first")
        if not meta_path.exists():
            raise DataError(f"{meta_path} (metadata of {path}) is missing; re-run the prepare_task stage")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{meta_path}: invalid JSON ({exc.msg}); re-run the prepare_task stage") from exc
        data = path.read_bytes()
        if meta.get("dataset_sha256") != sha256_bytes(data):
            raise IntegrityError(f"{path} does not match the sha256 recorded in {meta_path}; "
                                 "re-run the prepare_task stage")
        if meta.get("metric") not in METRICS:
            raise DataError(f"{meta_path}: metric={meta.get('metric')!r} must be one of {list(METRICS)}")
        items = []
        for lineno, line in enumerate(data.decode("utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg}); re-run prepare_task") from exc
                items.append(TaskItem.from_row(row, f"{path}:{lineno}"))
        try:
            check_document(TaskDatasetMeta, meta)
        except ValueError as exc:
            raise DataError(f"{meta_path}: not a valid dataset.meta.json ({exc}); "
                            "re-run the prepare_task stage") from exc
        return cls(name=meta["task"], kind=meta["kind"], metric_kind=meta["metric"], examples=items, meta=meta)


def write_dataset(path: Path, items: list[TaskItem], meta: dict) -> dict:
    """Write ``dataset.jsonl`` and ``dataset.meta.json`` atomically; return the full metadata."""
    path = Path(path)
    rows = [check_document(TaskDatasetRow, it.to_row()) for it in items]
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    full_meta = {
        "schema_version": SCHEMA_VERSION,
        **meta,
        "n_examples": len(items),
        "token_lengths": sorted({it.n_tokens for it in items}),
        "dataset_sha256": sha256_bytes(text.encode("utf-8")),
    }
    # Metadata first: a kill between the two writes leaves a sha mismatch that `load` reports.
    write_document(meta_path_of(path), TaskDatasetMeta, full_meta)
    atomic_write_text(path, text)
    return full_meta


def select_batch(ds: TaskDataset, n_prompts: int, path: Path) -> TaskBatch:
    """First ``n_prompts`` examples of the largest equal-length bucket (ties: shortest length)."""
    if not ds.posable or not ds.examples:
        raise DataError(f"{path}: task {ds.name!r} has no examples ({ds.reason or 'empty dataset'}); "
                        "circuit methods need prompt pairs")
    buckets = ds.buckets()
    best = max(buckets, key=lambda b: (len(b), -b.clean_tokens.shape[1]))
    n = min(n_prompts, len(best))
    if n < n_prompts:
        log.warning("%s: only %d prompts of one length (asked for %d)", path, n, n_prompts)
    ids = set(best.example_ids[:n])
    return make_batch([it for it in ds.examples if it.id in ids and it.n_tokens == best.clean_tokens.shape[1]],
                      ds.metric_kind)
