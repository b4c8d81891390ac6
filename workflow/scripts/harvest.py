# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.harvest import harvest
from mechflow.workflow import run_rule

run_rule(snakemake, harvest)  # noqa: F821 (injected by Snakemake)
