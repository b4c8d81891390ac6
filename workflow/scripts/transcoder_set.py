# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.dictionaries.transcoder_set import transcoder_set
from mechflow.workflow import run_rule

run_rule(snakemake, transcoder_set)  # noqa: F821 (injected by Snakemake)
