# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.dictionaries.transcoder_set import harvest_layers
from mechflow.workflow import run_rule

run_rule(snakemake, harvest_layers)  # noqa: F821 (injected by Snakemake)
