"""What the DAG needs to know about the analysis rules before any of them runs (read by
`mechflow.workflow.inputs`): their output files and which tasks and harvests they apply to.

Which tasks have subjects (decision): task kinds in `SUBJECT_KINDS` (``factual_recall``), known
from the task config at planning time; rule ``causal_trace`` is planned for those only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mechflow.harvest.hooks import harvested_hooks

SUBJECT_KINDS = frozenset({"factual_recall"})
ANALYZE_OUTPUTS = ("ablations.parquet", "ablations.png", "saliency.parquet", "saliency.png", "neurons.parquet",
                   "neurons.md", "analysis.md")
CAUSAL_TRACE_OUTPUTS = ("causal_tracing.parquet", "causal_tracing.png")


def has_subjects(task_cfg: Mapping[str, Any]) -> bool:
    """True for tasks whose prompts have subject positions (causal tracing applies)."""
    return task_cfg.get("kind") in SUBJECT_KINDS


def harvests_neurons(harvest_cfg: Mapping[str, Any]) -> bool:
    """True when the harvest holds some layer's ``mlp.hook_post`` (then `analyze` reads it)."""
    return any(h.endswith(".mlp.hook_post") for h in harvested_hooks(harvest_cfg))
