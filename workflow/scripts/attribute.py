# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.attribution.stage import attribute
from mechflow.workflow import run_rule

run_rule(snakemake, attribute)  # noqa: F821 (injected by Snakemake)
