# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.stats import run_statistics
from mechflow.workflow import run_rule

run_rule(snakemake, run_statistics)  # noqa: F821 (injected by Snakemake)
