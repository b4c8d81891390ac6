# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.workflow import run_rule
from mechflow.workflow.provenance import write_rulegraph

run_rule(snakemake, write_rulegraph)  # noqa: F821 (injected by Snakemake)
