# Shared setup: compose the Hydra config (once per Snakemake process), validate it, and import the
# input/params functions rules use. Stage logic lives in src/mechflow/, Snakemake glue in
# mechflow.workflow (a rule file that defines functions fails `snakemake --lint`).
from mechflow.report.figures import FIGURES as PAPER_FIGURES, TABLES as PAPER_TABLES
from mechflow.workflow import (
    PAIR_SEPARATOR,
    RUN_PATTERN,
    TASK_PATTERN,
    check_dictionary_widths,
    check_harvested_hooks,
    load_runs,
)
from mechflow.workflow.resources import gpu_of, mem_mb_of, runtime_of
from mechflow.workflow.inputs import (
    analysis_outputs,
    analysis_outputs_of,
    audit_outputs_of,
    audit_task_files_of,
    baselines_of,
    benchmarks_of,
    causal_tracing_of,
    circuit_outputs_of,
    circuit_scores_of,
    cross_model_inputs_of,
    cross_model_outputs_of,
    datasets_of,
    dictionary_dir_of,
    dictionary_figures_of,
    dictionary_metrics_of,
    edge_reference_cfg_of,
    feature_datasets_of,
    feature_matching_inputs_of,
    feature_outputs_of,
    graph_files_of,
    graph_outputs_of,
    harvest_dir_of,
    harvest_group_of,
    layer_transcoder_dir_of,
    neuron_harvest_of,
    pair_model_cfg,
    paper_figure_targets,
    provider_file_of,
    reference_outputs_of,
    reference_tasks,
    run_cfg,
    run_overrides,
    run_targets,
    sae_manifest_of,
    set_trainings_of,
    stage_cfg,
    statistics_inputs_of,
    statistics_of,
    steer_outputs_of,
    steer_sae_of,
    steer_transcoder_of,
    summary_results_of,
    task_cfg,
    task_input_file,
    tasks_of,
    threads_of_run,
    transcoder_manifests_of,
)

# load_runs composes every sweep point and validates every group once (JSON schemas generated from
# the typed config models: errors name the key and the fix); nothing here validates again.
RUNS = load_runs(config)
for _run in RUNS.values():
    check_harvested_hooks(_run)  # needs the whole run: a dictionary must train on a harvested hook
    check_dictionary_widths(_run)  # and have the width of that hook

R = "results/{run}"


wildcard_constraints:
    run=RUN_PATTERN,
    task=TASK_PATTERN,
    pair=f"{RUN_PATTERN}{PAIR_SEPARATOR}{RUN_PATTERN}",
    layer=r"\d+",
    group=r"\d+",
    prompt=r"\d+",
