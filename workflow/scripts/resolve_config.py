# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.workflow import run_rule
from mechflow.workflow.provenance import resolve_config

run_rule(snakemake, resolve_config)  # noqa: F821 (injected by Snakemake)
