# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.stats.feature_stage import run_feature_matching
from mechflow.workflow import run_rule

run_rule(snakemake, run_feature_matching)  # noqa: F821 (injected by Snakemake)
