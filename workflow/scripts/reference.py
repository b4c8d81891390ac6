# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.reference import reference
from mechflow.workflow import run_rule

run_rule(snakemake, reference)  # noqa: F821 (injected by Snakemake)
