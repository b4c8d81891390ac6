# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.workflow import run_rule
from mechflow.workflow.provenance import close_run

run_rule(snakemake, close_run)  # noqa: F821 (injected by Snakemake)
