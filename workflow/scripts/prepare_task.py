# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.tasks import prepare_task
from mechflow.workflow import run_rule

run_rule(snakemake, prepare_task)  # noqa: F821 (injected by Snakemake)
