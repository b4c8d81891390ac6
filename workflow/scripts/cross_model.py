# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.stats import cross_model
from mechflow.workflow import run_rule

run_rule(snakemake, cross_model)  # noqa: F821 (injected by Snakemake)
