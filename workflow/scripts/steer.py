# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.steer import steer
from mechflow.workflow import run_rule

run_rule(snakemake, steer)  # noqa: F821 (injected by Snakemake)
