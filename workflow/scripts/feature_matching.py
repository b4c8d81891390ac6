# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.features import feature_matching
from mechflow.workflow import run_rule

run_rule(snakemake, feature_matching)  # noqa: F821 (injected by Snakemake)
