"""Result paths of the DAG, in one place: `results/{run}/<stage>/...` and `results/cross_model/{pair}/...`.

Rule files declare outputs with the same folders (`R = "results/{run}"` in common.smk); input
functions build the paths they list from these helpers so a folder is spelled once.
"""

from __future__ import annotations

from pathlib import Path

from mechflow.contracts import filenames

RESULTS = "results"


def run_dir(run: str) -> str:
    return f"{RESULTS}/{run}"


def task_file(run: str, task: str, name: str) -> str:
    """A file of the `prepare_task` / `evaluate_task` folder of one task."""
    return f"{run_dir(run)}/tasks/{task}/{name}"


def harvest_index(run: str) -> str:
    return f"{run_dir(run)}/harvest/index.json"


def harvest_manifest(run: str, hook: str) -> Path:
    """The shard manifest of one harvested hook."""
    return Path(RESULTS) / run / "harvest" / hook / filenames.SHARD_MANIFEST


def attribution_dir(run: str, task: str) -> str:
    """Folder of a task's attribution outputs (rules attribute, analyze, causal_trace)."""
    return f"{run_dir(run)}/attribution/{task}"


def circuits_dir(run: str, task: str) -> str:
    """Folder of a task's circuit outputs (rule circuits)."""
    return f"{run_dir(run)}/circuits/{task}"


def dictionaries_dir(run: str) -> str:
    return f"{run_dir(run)}/dictionaries"


def features_dir(run: str) -> str:
    """Folder of the feature analysis of the run's SAE (rule features)."""
    return f"{run_dir(run)}/features"


def stats_dir(run: str, task: str) -> str:
    return f"{run_dir(run)}/stats/{task}"


def reference_dir(run: str, task: str) -> str:
    return f"{run_dir(run)}/reference/{task}"


def benchmark_dir(run: str, task: str) -> str:
    return f"{run_dir(run)}/benchmark/{task}"


def cross_model_dir(pair: str) -> str:
    return f"{RESULTS}/cross_model/{pair}"


def transcoder_set_dir(run: str) -> str:
    """Folder of the per-layer transcoder set (rules train_layer_transcoder, transcoder_set, transcoder_features)."""
    return f"{dictionaries_dir(run)}/transcoder_set"


def harvest_group_dir(run: str, group: int) -> str:
    """Temporary shards of one harvest group of the transcoder set (rule harvest_layers)."""
    return f"{run_dir(run)}/harvest_layers/group_{group}"


def audit_dir(run: str) -> str:
    """Folder of the run's black-box audit of an endpoint (rule audit)."""
    return f"{run_dir(run)}/audit"


def steer_dir(run: str, task: str) -> str:
    """Folder of a task's steering sweeps and records (rule steer)."""
    return f"{run_dir(run)}/steer/{task}"


def graphs_dir(run: str, task: str) -> str:
    """Folder of a task's attribution graphs (rules attribution_graph, graphs_summary)."""
    return f"{run_dir(run)}/graphs/{task}"
