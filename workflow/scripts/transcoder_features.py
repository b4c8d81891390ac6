# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.features.transcoders import transcoder_features
from mechflow.workflow import run_rule

run_rule(snakemake, transcoder_features)  # noqa: F821 (injected by Snakemake)
