"""Every Snakemake input and params function of the DAG (rule files import them; a rule file that
defines functions fails `snakemake --lint`).

Each takes the job's `wildcards` and reads the run `runs.RUNS[wildcards.run]`. Params functions
return exactly the config keys a rule reads, because Snakemake re-runs a job when its params change:
e.g. `stage_cfg("benchmark")` leaves out `BenchmarkConfig.SELECTION_KEYS` (`enabled`, `tasks`), so
`benchmark` does not re-run when only the selection of benchmarked tasks changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from mechflow.workflow import paths
from mechflow.workflow.runs import RUNS, model_pairs, pair_runs, tasks_of_setting, transcoder_hooks

# ----------------------------------------------------------------------------- config (params)


def stage_cfg(group: str) -> Callable[[Any], dict]:
    """A Snakemake `params` function returning the resolved config group of the job's run (`job_run`).

    Left out, so that editing them does not re-run the rule (params are a rerun trigger): the keys the
    group's config class lists in ``SELECTION_KEYS`` (which jobs exist, not what a job computes, e.g.
    ``benchmark.enabled``, ``benchmark.tasks``). One rule reads a declared subset of another stage's
    group: `edge_reference` (the exact part of ``reference``, `edge_reference_cfg_of`).
    """

    def params(wildcards) -> dict:
        cfg = RUNS[job_run(wildcards)].stage(group)
        drop = set(selection_keys(group))
        return {k: v for k, v in cfg.items() if k not in drop} if drop else cfg

    params.__name__ = f"stage_cfg_{group}"
    return params


def job_run(wildcards) -> str:
    """The run whose config a job reads: its `run` wildcard, or for a cross-model job (`pair`) the
    pair's first run (the two runs differ only in the model)."""
    run = getattr(wildcards, "run", None)
    return run if run is not None else pair_runs(wildcards.pair)[0]


def selection_keys(group: str) -> tuple[str, ...]:
    """``SELECTION_KEYS`` of the group's typed config (none for a group without one)."""
    from mechflow.config import CONFIG_GROUPS, group_model

    return getattr(group_model(group), "SELECTION_KEYS", ()) if group in CONFIG_GROUPS else ()


def task_cfg(wildcards) -> dict:
    """`params` function: the resolved config of the job's task."""
    return RUNS[wildcards.run].cfg["task"][wildcards.task]


def run_cfg(wildcards) -> dict:
    """`params` function: the whole resolved config of the job's run."""
    return RUNS[wildcards.run].cfg


def threads_of_run(wildcards) -> int:
    return RUNS[wildcards.run].cfg["threads"]


# ----------------------------------------------------------------------------- tasks


def tasks_of(wildcards) -> list[str]:
    return sorted(RUNS[wildcards.run].cfg["task"])


def baselines_of(wildcards) -> list[str]:
    return [paths.task_file(wildcards.run, task, "baseline.json") for task in tasks_of(wildcards)]


def datasets_of(wildcards) -> list[str]:
    return [paths.task_file(wildcards.run, task, "dataset.jsonl") for task in tasks_of(wildcards)]


def task_input_file(wildcards) -> list[str]:
    """The user file of a `kind: jsonl` task (relative paths are relative to the working directory)."""
    task = RUNS[wildcards.run].cfg["task"][wildcards.task]
    return [task["path"]] if task.get("kind") == "jsonl" and task.get("path") else []


# ----------------------------------------------------------------------------- harvest, dictionaries


def harvest_dir_of(wildcards) -> Path:
    return Path(f"{paths.run_dir(wildcards.run)}/harvest")


def sae_manifest_of(wildcards) -> Path:
    """The harvest manifest of the hook the run's SAE trains on."""
    return paths.harvest_manifest(wildcards.run, RUNS[wildcards.run].cfg["sae"]["hook"])


def transcoder_manifests_of(wildcards) -> list[Path]:
    """MLP-in and MLP-out manifests of every transcoder layer, interleaved (in, out, in, out, ...)."""
    return [paths.harvest_manifest(wildcards.run, h) for pair in transcoder_hooks(wildcards.run) for h in pair]


def dictionary_dir_of(kind: str) -> Callable[[Any], Path]:
    def params(wildcards) -> Path:
        return Path(paths.dictionaries_dir(wildcards.run)) / kind

    params.__name__ = f"dictionary_dir_of_{kind}"
    return params


def dictionary_figures_of(wildcards) -> list[str]:
    """The training curves of the run's SAE and transcoder (recorded by the run manifest)."""
    return [f"{paths.dictionaries_dir(wildcards.run)}/{kind}/training_curves.png" for kind in ("sae", "transcoder")]


def dictionary_metrics_of(wildcards) -> list[str]:
    return [f"{paths.dictionaries_dir(wildcards.run)}/sae_metrics.json",
            f"{paths.dictionaries_dir(wildcards.run)}/transcoder_metrics.json"]


FEATURE_OUTPUTS = ("features.jsonl", "features.html", "histograms.png", "task_attribution.parquet", "summary.json")


def feature_datasets_of(wildcards) -> list[str]:
    """Input function of rule `features`: datasets of the tasks in `features.tasks`."""
    from mechflow.features.config import FeaturesConfig

    tasks = FeaturesConfig.from_dict(RUNS[wildcards.run].stage("features")).tasks  # class defaults, one place
    wanted = tasks_of_setting(wildcards.run, "features.tasks", tasks)
    return [paths.task_file(wildcards.run, task, "dataset.jsonl") for task in wanted]


def feature_outputs_of(wildcards) -> list[str]:
    """The final outputs of rule `features` for one run (inputs of `run_manifest`)."""
    return [f"{paths.features_dir(wildcards.run)}/{name}" for name in FEATURE_OUTPUTS]


# ----------------------------------------------------------------------------- attribution, analysis, circuits


def neuron_harvest_of(wildcards) -> list[str]:
    """The harvest index, only when the run harvests some `blocks.L.mlp.hook_post` (neuron contexts)."""
    from mechflow.attribution.planning import harvests_neurons

    return [paths.harvest_index(wildcards.run)] if harvests_neurons(RUNS[wildcards.run].stage("harvest")) else []


def causal_tracing_of(wildcards) -> list[str]:
    """The task's causal tracing table when it has subject positions (summarised in analysis.md)."""
    from mechflow.attribution.planning import has_subjects

    if has_subjects(RUNS[wildcards.run].cfg["task"][wildcards.task]):
        return [f"{paths.attribution_dir(wildcards.run, wildcards.task)}/causal_tracing.parquet"]
    return []


def analysis_outputs(run: str, run_cfg: dict) -> list[str]:
    """Every analysis output of a run: `analyze` per task, `causal_trace` for tasks with subjects."""
    from mechflow.attribution.planning import ANALYZE_OUTPUTS, CAUSAL_TRACE_OUTPUTS, has_subjects

    out = []
    for task in sorted(run_cfg["task"]):
        base = paths.attribution_dir(run, task)
        out += [f"{base}/{name}" for name in ANALYZE_OUTPUTS]
        if has_subjects(run_cfg["task"][task]):
            out += [f"{base}/{name}" for name in CAUSAL_TRACE_OUTPUTS]
    return out


def analysis_outputs_of(wildcards) -> list[str]:
    """Every `analyze` output of the run's tasks, plus `causal_trace` outputs where the task has subjects."""
    return analysis_outputs(wildcards.run, RUNS[wildcards.run].cfg)


def circuit_outputs_of(wildcards) -> list[str]:
    """Attribution outputs and the circuit (edges or nodes, `circuits.unit`) of every task."""
    out = []
    for task in tasks_of(wildcards):
        out += [f"{paths.attribution_dir(wildcards.run, task)}/{name}"
                for name in ("node_scores.parquet", "head_patching.png", "logit_lens.png")]
        out.append(f"{paths.circuits_dir(wildcards.run, task)}/circuit.json")
        out.append(f"{paths.circuits_dir(wildcards.run, task)}/circuit.png")
    return out


# ----------------------------------------------------------------------------- reference


REFERENCE_OUTPUTS = ("edge_reference.parquet", "auc.json", "roc.png", "reference.md")


def edge_reference_cfg_of(wildcards) -> dict:
    """The exact part of the run's ``reference`` group (prompts, restriction, sample, batch size)."""
    from mechflow.reference.config import exact_settings

    return exact_settings(RUNS[wildcards.run].stage("reference"))


def circuit_scores_of(wildcards) -> dict[str, str]:
    """The circuit rule's edge scores (reused when on the same prompts); none where edges are undefined."""
    from mechflow.models.config import ModelConfig

    if not ModelConfig.from_dict(RUNS[wildcards.run].cfg["model"]).edge_circuits:
        return {}
    base = paths.circuits_dir(wildcards.run, wildcards.task)
    return {"circuit": f"{base}/circuit.json", "edge_scores": f"{base}/edge_scores.parquet"}


def reference_tasks(run: str) -> list[str]:
    """``reference.tasks`` of the run (null: every selected task), each checked against the run's tasks."""
    return sorted(tasks_of_setting(run, "reference.tasks", RUNS[run].cfg["reference"].get("tasks")))


def reference_outputs_of(wildcards) -> list[str]:
    """The reference outputs of every task in ``reference.tasks`` (the edge part is skipped inside
    where edges are undefined)."""
    return [f"{paths.reference_dir(wildcards.run, task)}/{name}"
            for task in reference_tasks(wildcards.run) for name in REFERENCE_OUTPUTS]


# ----------------------------------------------------------------------------- statistics, cross-model


def statistics_inputs_of(wildcards) -> dict[str, str]:
    """Named inputs of `statistics`: node scores and the circuit's files, for every model (the
    `circuit` rule finds an edge circuit where edge patching is defined, else a node circuit)."""
    attribution = paths.attribution_dir(wildcards.run, wildcards.task)
    circuits = paths.circuits_dir(wildcards.run, wildcards.task)
    return {"node_scores": f"{attribution}/node_scores.parquet", "prompts": f"{attribution}/prompts.parquet",
            "model_card": f"{paths.run_dir(wildcards.run)}/model_card.json", "circuit": f"{circuits}/circuit.json",
            "circuit_prompts": f"{circuits}/circuit_prompts.parquet",
            "curve_prompts": f"{circuits}/curve_prompts.parquet"}



def statistics_of(wildcards) -> list[str]:
    """Statistics outputs the run manifest records (and the report cites)."""
    return [f"{paths.stats_dir(wildcards.run, task)}/{name}" for task in tasks_of(wildcards)
            for name in ("bootstrap.parquet", "stability.json", "forest.png", "tau_heatmap.png")]


def cross_model_inputs_of(wildcards) -> dict[str, str]:
    inputs = {}
    for side, run in zip("ab", pair_runs(wildcards.pair)):
        folder = paths.attribution_dir(run, wildcards.task)
        inputs.update({f"node_scores_{side}": f"{folder}/node_scores.parquet",
                       f"head_types_{side}": f"{folder}/head_types.parquet",
                       f"prompts_{side}": f"{folder}/prompts.parquet",
                       f"model_card_{side}": f"{paths.run_dir(run)}/model_card.json",
                       f"dataset_{side}": paths.task_file(run, wildcards.task, "dataset.jsonl")})
    return inputs


def pair_model_cfg(side: str) -> Callable[[Any], dict]:
    def params(wildcards) -> dict:
        return RUNS[pair_runs(wildcards.pair)["ab".index(side)]].cfg["model"]

    params.__name__ = f"pair_model_cfg_{side}"
    return params



def feature_matching_inputs_of(wildcards) -> dict[str, Any]:
    """Named inputs of `feature_matching`: each run's SAE (train_sae's training.json, in the SAELens
    folder) and the task datasets of the pair's shared tasks (their prompts are shared texts)."""
    a, b = pair_runs(wildcards.pair)
    shared = sorted(set(RUNS[a].cfg["task"]) & set(RUNS[b].cfg["task"]))
    inputs: dict[str, Any] = {}
    for side, run in zip("ab", (a, b)):
        inputs[f"training_{side}"] = f"{paths.dictionaries_dir(run)}/sae/training.json"
        inputs[f"datasets_{side}"] = [paths.task_file(run, task, "dataset.jsonl") for task in shared]
    return inputs


# ----------------------------------------------------------------------------- benchmark, summary, run



def benchmarks_of(wildcards) -> list[str]:
    """The benchmark tables of the run, when `benchmark.enabled` (opt in: it is slow)."""
    from mechflow.benchmark.config import BenchmarkConfig

    bench = BenchmarkConfig.from_dict(RUNS[wildcards.run].cfg["benchmark"])  # class defaults, one place
    if not bench.enabled:
        return []
    tasks = tasks_of_setting(wildcards.run, "benchmark.tasks", bench.tasks)
    return [f"{paths.benchmark_dir(wildcards.run, task)}/table.csv" for task in tasks]


def summary_results_of(wildcards) -> list[str]:
    """JSON results whose headline numbers go into the run's summary table."""
    out = dictionary_metrics_of(wildcards)
    for task in tasks_of(wildcards):
        out.append(f"{paths.attribution_dir(wildcards.run, task)}/agreement.json")
        out.append(f"{paths.circuits_dir(wildcards.run, task)}/circuit.json")
    return out


def cross_model_outputs_of(wildcards) -> list[str]:
    """FCAS and CKA (with their figures) of every model pair the run belongs to (recorded by its manifest,
    cited by its report)."""
    out = []
    for pair, (a, b) in model_pairs(RUNS).items():
        if wildcards.run in (a, b):
            shared = sorted(set(RUNS[a].cfg["task"]) & set(RUNS[b].cfg["task"]))
            out += [f"{paths.cross_model_dir(pair)}/{task}/{name}" for task in shared
                    for name in ("fcas.json", "fcas_null.png", "cka.json", "cka.png")]
    return out


def run_targets(wildcards) -> list[str]:
    """Every run's manifest and report, and the cross-model comparison of every pair of runs that differ only in
    the model."""
    targets = [f"{paths.run_dir(name)}/{file}" for name in RUNS for file in ("run_manifest.json", "report/report.pdf")]
    for pair, (a, b) in model_pairs(RUNS).items():
        shared = sorted(set(RUNS[a].cfg["task"]) & set(RUNS[b].cfg["task"]))
        targets += [f"{paths.cross_model_dir(pair)}/{task}/fcas.json" for task in shared]
        if "sae" in RUNS[a].cfg and "sae" in RUNS[b].cfg:  # SAE feature matching needs both SAEs
            targets.append(f"{paths.cross_model_dir(pair)}/features/feature_matching.json")
    return targets


# ----------------------------------------------------------------------------- transcoder set, graphs


def _set_cfg(run: str):
    from mechflow.dictionaries.config import TranscoderSetConfig

    return TranscoderSetConfig.from_dict(RUNS[run].cfg["transcoder_set"])


def set_layers_of(run: str) -> list[int]:
    from mechflow.dictionaries.transcoder_set import set_layers

    return set_layers(_set_cfg(run), RUNS[run].cfg["model"])


def harvest_group_of(wildcards) -> str:
    """The harvest group folder holding the MLP in/out shards of the job's layer."""
    from mechflow.dictionaries.transcoder_set import group_of

    return paths.harvest_group_dir(wildcards.run, group_of(_set_cfg(wildcards.run), RUNS[wildcards.run].cfg["model"],
                                                             int(wildcards.layer)))


def layer_transcoder_dir_of(wildcards) -> Path:
    return Path(paths.transcoder_set_dir(wildcards.run)) / f"layer_{wildcards.layer}"


def set_trainings_of(wildcards) -> list[str]:
    """training.json of every layer of the run's transcoder set."""
    return [f"{paths.transcoder_set_dir(wildcards.run)}/layer_{layer}/training.json"
            for layer in set_layers_of(wildcards.run)]


def _graph_cfg(run: str):
    from mechflow.graphs.config import GraphConfig

    return GraphConfig.from_dict(RUNS[run].cfg["graph"])


def graph_tasks_of(run: str) -> list[str]:
    gcfg = _graph_cfg(run)
    return tasks_of_setting(run, "graph.tasks", gcfg.tasks) if gcfg.enabled else []


def graph_files_of(wildcards) -> dict[str, list[str]]:
    """Named inputs of `graphs_summary`: each prompt's graph.json and frontend JSON."""
    from mechflow.graphs.stage import slug_of

    folder = paths.graphs_dir(wildcards.run, wildcards.task)
    prompts = _graph_cfg(wildcards.run).prompts
    return {"summaries": [f"{folder}/p{p}/graph.json" for p in prompts],
            "neuronpedia": [f"{folder}/{slug_of(wildcards.task, p)}.json" for p in prompts]}


def graph_outputs_of(wildcards) -> list[str]:
    """The graph stage's final outputs of a run (inputs of `run_manifest`; none unless graph.enabled)."""
    tasks = graph_tasks_of(wildcards.run)
    if not tasks:
        return []
    tset = paths.transcoder_set_dir(wildcards.run)
    out = [f"{tset}/set.json", f"{tset}/per_layer.png"]
    out += [f"{tset}/layer_{layer}/training_curves.png" for layer in set_layers_of(wildcards.run)]
    prompts = _graph_cfg(wildcards.run).prompts
    for task in tasks:
        folder = paths.graphs_dir(wildcards.run, task)
        out += [f"{folder}/graphs.md", f"{folder}/graph-metadata.json"]
        out += [f"{folder}/p{p}/{name}" for p in prompts for name in ("graph.json", "graph.png")]
    return out


# ----------------------------------------------------------------------------- steer

STEER_OUTPUTS = ("summary.json", "interventions.jsonl", "activations.jsonl", "directions.safetensors",
                 "layers.png", "sweep.png", "generations.md")


def _steer_cfg(run: str):
    from mechflow.steer.config import SteerConfig

    return SteerConfig.from_dict(RUNS[run].cfg.get("steer"))


def steer_tasks_of(run: str) -> list[str]:
    scfg = _steer_cfg(run)
    return tasks_of_setting(run, "steer.tasks", scfg.tasks) if scfg.enabled else []


def steer_sae_of(wildcards) -> list[str]:
    """The run's SAE `training.json` when the steer stage clamps SAE latents (n_features or sae_features)."""
    scfg = _steer_cfg(wildcards.run)
    if "sae" not in RUNS[wildcards.run].cfg or not (scfg.n_features or scfg.sae_features):
        return []
    return [f"{paths.dictionaries_dir(wildcards.run)}/sae/training.json"]


def steer_transcoder_of(wildcards) -> list[str]:
    """The run's transcoder `training.json` when the steer stage clamps transcoder latents."""
    scfg = _steer_cfg(wildcards.run)
    wanted = scfg.transcoder_features or (scfg.n_transcoder_features and "transcoder" in RUNS[wildcards.run].cfg)
    return [f"{paths.dictionaries_dir(wildcards.run)}/transcoder/training.json"] if wanted else []


def steer_outputs_of(wildcards) -> list[str]:
    """The steer stage's outputs of a run (inputs of `run_manifest`; none unless steer.enabled)."""
    return [f"{paths.steer_dir(wildcards.run, task)}/{name}" for task in steer_tasks_of(wildcards.run)
            for name in STEER_OUTPUTS]


# ----------------------------------------------------------------------------- audit

AUDIT_OUTPUTS = ("summary.json", "responses.jsonl", "scores.jsonl", "audit.png")


def _audit_cfg(run: str):
    from mechflow.audit.config import AuditConfig

    return AuditConfig.from_dict(RUNS[run].cfg.get("audit"))


def audit_task_files_of(wildcards) -> dict[str, list[str]]:
    """Named inputs of `audit`: dataset.jsonl and baseline.json of each task in `audit.whitebox_tasks`."""
    acfg = _audit_cfg(wildcards.run)
    tasks = tasks_of_setting(wildcards.run, "audit.whitebox_tasks", acfg.whitebox_tasks) if acfg.enabled else []
    return {"datasets": [paths.task_file(wildcards.run, t, "dataset.jsonl") for t in tasks],
            "baselines": [paths.task_file(wildcards.run, t, "baseline.json") for t in tasks]}


def audit_outputs_of(wildcards) -> list[str]:
    """The audit's outputs of a run (inputs of `run_manifest`; none unless audit.enabled)."""
    if not _audit_cfg(wildcards.run).enabled:
        return []
    return [f"{paths.audit_dir(wildcards.run)}/{name}" for name in AUDIT_OUTPUTS]


# ----------------------------------------------------------------------------- report


def provider_file_of(wildcards) -> list[str]:
    """The run's provider file (`report.provider_file`), when set: an input, so editing it re-runs the report."""
    from mechflow.report.stage import provider_path

    path = provider_path(RUNS[wildcards.run].cfg["report"].get("provider_file"))
    return [str(path)] if path is not None else []


def paper_figure_targets(wildcards) -> list[str]:
    """Input of the target rule `figures`: every run's paper figures (PNG, PDF) and tables (CSV, LaTeX)."""
    from mechflow.report.figures import FIGURES, TABLES

    out = []
    for run in RUNS:
        folder = paths.run_dir(run)
        out += [f"{folder}/figures/{name}.{ext}" for name in FIGURES for ext in ("png", "pdf")]
        out += [f"{folder}/tables/{name}.{ext}" for name in TABLES for ext in ("csv", "tex")]
    return out


def run_overrides(wildcards) -> list[str]:
    """`params` function: the Hydra overrides that made the run (for the commands that regenerate it)."""
    return list(RUNS[wildcards.run].overrides)
