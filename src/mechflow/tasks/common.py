"""What every task builder returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from mechflow.tasks.dataset import TaskItem


@dataclass
class Built:
    """Examples built for one tokenizer, plus what the per-tokenizer filters removed.

    Attributes:
        items: the examples.
        metric: ``logit_diff`` or ``prob_diff``.
        details: filter statistics and design choices, recorded in ``dataset.meta.json``.
        posable: False when the task cannot be posed with this tokenizer (items is then empty).
        reason: why not, in words a user can act on.
    """

    items: list[TaskItem]
    metric: str
    details: dict = field(default_factory=dict)
    posable: bool = True
    reason: str | None = None
