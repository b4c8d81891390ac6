"""Snakemake helpers of ``workflow/rules/reference.smk`` (input/params functions; Snakemake's lint
wants functions out of rule files). They read the runs `mechflow.workflow.load_runs` composed."""

from __future__ import annotations

from mechflow.reference.config import exact_settings
from mechflow.workflow import RUNS, tasks_of_setting

OUTPUT_NAMES = ("edge_reference.parquet", "auc.json", "roc.png", "reference.md")


def edge_reference_cfg_of(wildcards) -> dict:
    """The exact part of the run's ``reference`` group (prompts, restriction, sample, batch size)."""
    return exact_settings(RUNS[wildcards.run].stage("reference"))


def circuit_scores_of(wildcards) -> dict[str, str]:
    """The circuit rule's edge scores (reused when on the same prompts); none where edges are undefined."""
    if not RUNS[wildcards.run].cfg["model"].get("edge_circuits", True):
        return {}
    base = f"results/{wildcards.run}/circuits/{wildcards.task}"
    return {"circuit": f"{base}/circuit.json", "edge_scores": f"{base}/edge_scores.parquet"}


def reference_tasks(run: str) -> list[str]:
    """``reference.tasks`` of the run (null: every selected task), each checked against the run's tasks."""
    return sorted(tasks_of_setting(run, "reference.tasks", RUNS[run].cfg["reference"].get("tasks")))


def reference_outputs_of(wildcards) -> list[str]:
    """The reference outputs of every task in ``reference.tasks`` (the edge part is skipped inside
    where edges are undefined)."""
    return [f"results/{wildcards.run}/reference/{task}/{name}"
            for task in reference_tasks(wildcards.run) for name in OUTPUT_NAMES]
