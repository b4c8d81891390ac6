# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.dictionaries import evaluate_transcoder
from mechflow.workflow import run_rule

run_rule(snakemake, evaluate_transcoder)  # noqa: F821 (injected by Snakemake)
