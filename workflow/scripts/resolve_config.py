# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.workflow.provenance import resolve_config
from mechflow.workflow import run_rule

run_rule(snakemake, resolve_config)  # noqa: F821 (injected by Snakemake)
