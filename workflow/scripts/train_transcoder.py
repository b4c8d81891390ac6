# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.dictionaries import train_transcoder
from mechflow.workflow import run_rule

run_rule(snakemake, train_transcoder)  # noqa: F821 (injected by Snakemake)
