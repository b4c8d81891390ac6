# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.audit import audit
from mechflow.workflow import run_rule

run_rule(snakemake, audit)  # noqa: F821 (injected by Snakemake)
