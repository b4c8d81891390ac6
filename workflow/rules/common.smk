# Shared setup: compose the Hydra config (once per Snakemake process), validate it, and define
# the helpers rules use. Stage logic lives in src/mechflow/, never here.
from pathlib import Path

from snakemake.utils import validate

from mechflow.workflow import (
    RUN_PATTERN,
    TASK_PATTERN,
    PAIR_SEPARATOR,
    check_harvested_hooks,
    cross_model_dir_of,
    cross_model_inputs_of,
    model_pairs,
    pair_model_cfg,
    pair_stats_cfg,
    statistics_inputs_of,
    stats_dir_of,
    dictionary_dir_of,
    load_runs,
    run_cfg,
    sae_manifest_of,
    stage_cfg,
    task_cfg,
    tasks_of_setting,
    transcoder_manifests_of,
)


RUNS = load_runs(config)
SCHEMAS = Path(workflow.basedir) / "workflow" / "schemas" / "config"
for _run in RUNS.values():
    # compose_runs already validated with readable errors; this is Snakemake's own check.
    check_harvested_hooks(_run)
    for _group in ("model", "corpus", "harvest", "summary", "sae", "transcoder", "attribution", "circuit", "stats", "benchmark", "reference"):
        validate(_run.cfg[_group], str(SCHEMAS / f"{_group}.schema.json"), set_default=False)
    for _task in _run.cfg["task"].values():
        validate(_task, str(SCHEMAS / "task.schema.json"), set_default=False)

R = "results/{run}"
PAIRS = model_pairs(RUNS)


wildcard_constraints:
    run=RUN_PATTERN,
    task=TASK_PATTERN,
    pair=f"{RUN_PATTERN}{PAIR_SEPARATOR}{RUN_PATTERN}",


def tasks_of(wildcards):
    return sorted(RUNS[wildcards.run].cfg["task"])


def baselines_of(wildcards):
    return expand(f"results/{wildcards.run}/tasks/{{task}}/baseline.json", task=tasks_of(wildcards))


def datasets_of(wildcards):
    return expand(f"results/{wildcards.run}/tasks/{{task}}/dataset.jsonl", task=tasks_of(wildcards))


def harvest_dir_of(wildcards):
    return Path(f"results/{wildcards.run}/harvest")


def task_input_file(wildcards):
    """The user file of a `kind: jsonl` task (relative paths are relative to the working directory)."""
    task = RUNS[wildcards.run].cfg["task"][wildcards.task]
    return [task["path"]] if task.get("kind") == "jsonl" and task.get("path") else []


def threads_of_run(wildcards):
    return RUNS[wildcards.run].cfg["threads"]


def dictionary_metrics_of(wildcards):
    return [f"results/{wildcards.run}/dictionaries/sae_metrics.json",
            f"results/{wildcards.run}/dictionaries/transcoder_metrics.json"]


def circuit_outputs_of(wildcards):
    """Attribution outputs and the circuit (edges or nodes, `circuit.unit`) of every task."""
    run = RUNS[wildcards.run].cfg
    out = []
    for task in sorted(run["task"]):
        out.append(f"results/{wildcards.run}/circuits/{task}/node_scores.parquet")
        out.append(f"results/{wildcards.run}/circuits/{task}/circuit.json")
    return out


def summary_results_of(wildcards):
    """JSON results whose headline numbers go into the run's summary table."""
    run = RUNS[wildcards.run].cfg
    out = [p for p in dictionary_metrics_of(wildcards) if p.endswith("_metrics.json")]
    for task in sorted(run["task"]):
        out.append(f"results/{wildcards.run}/circuits/{task}/agreement.json")
        out.append(f"results/{wildcards.run}/circuits/{task}/circuit.json")
    return out


def benchmark_dir_of(wildcards):
    return Path(f"results/{wildcards.run}/benchmark/{wildcards.task}")


def benchmarks_of(wildcards):
    """The benchmark tables of the run, when `benchmark.enabled` (opt in: it is slow)."""
    run = RUNS[wildcards.run].cfg
    bench = run.get("benchmark", {})
    if not bench.get("enabled", False):
        return []
    tasks = tasks_of_setting(wildcards.run, "benchmark.tasks", bench.get("tasks", []))
    return [f"results/{wildcards.run}/benchmark/{task}/table.csv" for task in tasks]


def statistics_of(wildcards):
    return [f"results/{wildcards.run}/stats/{task}/bootstrap.parquet" for task in sorted(RUNS[wildcards.run].cfg["task"])]


def run_targets(wildcards):
    """Every run's manifest, and the cross-model comparison of every pair of runs that differ only in the model."""
    targets = [f"results/{name}/run_manifest.json" for name in RUNS]
    for pair, (a, b) in PAIRS.items():
        shared = sorted(set(RUNS[a].cfg["task"]) & set(RUNS[b].cfg["task"]))
        targets += [f"results/cross_model/{pair}/{task}/fcas.json" for task in shared]
        if "sae" in RUNS[a].cfg and "sae" in RUNS[b].cfg:  # SAE feature matching needs both SAEs
            targets.append(f"results/cross_model/{pair}/features/feature_matching.json")
    return targets
