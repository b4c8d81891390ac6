# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.stats import stats
from mechflow.workflow import run_rule

run_rule(snakemake, stats)  # noqa: F821 (injected by Snakemake)
