# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.dictionaries.features import feature_analysis
from mechflow.workflow import run_rule

run_rule(snakemake, feature_analysis)  # noqa: F821 (injected by Snakemake)
