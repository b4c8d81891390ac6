# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.attribution.analyze import analyze
from mechflow.workflow import run_rule

run_rule(snakemake, analyze)  # noqa: F821 (injected by Snakemake)
