# mechflow: the whole pipeline as one DAG. Run from the repo root:
#   snakemake --cores 2 --workflow-profile workflow/profiles/default
# Configs are Hydra groups under config/; override them with
#   --config overrides='["model=gemma3_270m","harvest.layers=[3,6]"]'
from snakemake.utils import min_version

min_version("9.0")


include: "workflow/rules/common.smk"
include: "workflow/rules/config.smk"
include: "workflow/rules/tasks.smk"
include: "workflow/rules/harvest.smk"
include: "workflow/rules/dictionaries.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/graphs.smk"
include: "workflow/rules/steer.smk"
include: "workflow/rules/audit.smk"
include: "workflow/rules/attribution.smk"
include: "workflow/rules/circuits.smk"
include: "workflow/rules/stats.smk"
include: "workflow/rules/benchmark.smk"
include: "workflow/rules/reference.smk"
include: "workflow/rules/summary.smk"
include: "workflow/rules/report.smk"


# Every output of every run (one run per sweep point of the overrides).
rule all:
    default_target: True
    input:
        run_targets,
