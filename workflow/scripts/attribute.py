# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.attribution.stage import run_attribution
from mechflow.workflow import run_rule

run_rule(snakemake, run_attribution)  # noqa: F821 (injected by Snakemake)
