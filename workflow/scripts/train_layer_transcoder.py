# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.dictionaries.transcoder_set import train_layer_transcoder
from mechflow.workflow import run_rule

run_rule(snakemake, train_layer_transcoder)  # noqa: F821 (injected by Snakemake)
