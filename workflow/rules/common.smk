# Shared setup: compose the Hydra config (once per Snakemake process), validate it, and import the
# input/params functions rules use. Stage logic lives in src/mechflow/, Snakemake glue in
# mechflow.workflow (a rule file that defines functions fails `snakemake --lint`).
from pathlib import Path

from snakemake.utils import validate

from mechflow.workflow import PAIR_SEPARATOR, RUN_PATTERN, TASK_PATTERN, check_harvested_hooks, load_runs
from mechflow.workflow.inputs import (
    analysis_cfg_of,
    analysis_outputs,
    analysis_outputs_of,
    baselines_of,
    benchmarks_of,
    causal_tracing_cfg_of,
    causal_tracing_of,
    circuit_outputs_of,
    circuit_scores_of,
    cross_model_inputs_of,
    datasets_of,
    dictionary_dir_of,
    dictionary_metrics_of,
    edge_reference_cfg_of,
    feature_datasets_of,
    feature_matching_inputs_of,
    feature_outputs_of,
    harvest_dir_of,
    neuron_harvest_of,
    pair_corpus_cfg,
    pair_feature_stats_cfg,
    pair_model_cfg,
    pair_stats_cfg,
    reference_outputs_of,
    reference_tasks,
    run_cfg,
    run_targets,
    sae_manifest_of,
    stage_cfg,
    statistics_inputs_of,
    statistics_of,
    summary_results_of,
    task_cfg,
    task_input_file,
    tasks_of,
    threads_of_run,
    transcoder_manifests_of,
)

RUNS = load_runs(config)
SCHEMAS = Path(workflow.basedir) / "workflow" / "schemas" / "config"
for _run in RUNS.values():
    # compose_runs already validated with readable errors; this is Snakemake's own check.
    check_harvested_hooks(_run)
    for _group in (
        "model",
        "corpus",
        "harvest",
        "summary",
        "sae",
        "transcoder",
        "attribution",
        "circuits",
        "stats",
        "benchmark",
        "reference",
    ):
        validate(_run.cfg[_group], str(SCHEMAS / f"{_group}.schema.json"), set_default=False)
    for _task in _run.cfg["task"].values():
        validate(_task, str(SCHEMAS / "task.schema.json"), set_default=False)

R = "results/{run}"


wildcard_constraints:
    run=RUN_PATTERN,
    task=TASK_PATTERN,
    pair=f"{RUN_PATTERN}{PAIR_SEPARATOR}{RUN_PATTERN}",
