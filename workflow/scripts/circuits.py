# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.circuits.stage import circuits
from mechflow.workflow import run_rule

run_rule(snakemake, circuits)  # noqa: F821 (injected by Snakemake)
