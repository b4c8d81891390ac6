# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.attribution.analysis import run_causal_tracing
from mechflow.workflow import run_rule

run_rule(snakemake, run_causal_tracing)  # noqa: F821 (injected by Snakemake)
