# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.graphs.stage import attribution_graph
from mechflow.workflow import run_rule

run_rule(snakemake, attribution_graph)  # noqa: F821 (injected by Snakemake)
