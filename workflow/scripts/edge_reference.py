# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.reference import edge_reference
from mechflow.workflow import run_rule

run_rule(snakemake, edge_reference)  # noqa: F821 (injected by Snakemake)
