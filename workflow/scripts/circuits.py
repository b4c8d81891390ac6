# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.circuits.stage import run_circuit
from mechflow.workflow import run_rule

run_rule(snakemake, run_circuit)  # noqa: F821 (injected by Snakemake)
