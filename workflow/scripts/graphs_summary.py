# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.graphs.stage import graphs_summary
from mechflow.workflow import run_rule

run_rule(snakemake, graphs_summary)  # noqa: F821 (injected by Snakemake)
