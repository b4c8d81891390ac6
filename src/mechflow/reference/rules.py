"""Snakemake helpers of ``workflow/rules/reference.smk`` (input/params functions; Snakemake's lint
wants functions out of rule files). They read the runs `mechflow.workflow.load_runs` composed."""

from __future__ import annotations

from mechflow.errors import ConfigError
from mechflow.reference.config import exact_settings
from mechflow.workflow import RUNS

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
    cfg = RUNS[run].cfg
    if cfg["reference"].get("tasks") is None:
        return sorted(cfg["task"])
    tasks = list(cfg["reference"]["tasks"])
    missing = [t for t in tasks if t not in cfg["task"]]
    if missing:
        raise ConfigError(f"reference.tasks: {missing} not among the run's tasks {sorted(cfg['task'])}; "
                          f"select them in `task` or set reference.tasks=[...]")
    return sorted(tasks)


def reference_outputs_of(wildcards) -> list[str]:
    """The reference outputs of every task in ``reference.tasks`` (the edge part is skipped inside
    where edges are undefined)."""
    return [f"results/{wildcards.run}/reference/{task}/{name}"
            for task in reference_tasks(wildcards.run) for name in OUTPUT_NAMES]
