# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.attribution.causal_trace import causal_trace
from mechflow.workflow import run_rule

run_rule(snakemake, causal_trace)  # noqa: F821 (injected by Snakemake)
