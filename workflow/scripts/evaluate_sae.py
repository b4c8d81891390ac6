# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.dictionaries import evaluate_sae
from mechflow.workflow import run_rule

run_rule(snakemake, evaluate_sae)  # noqa: F821 (injected by Snakemake)
