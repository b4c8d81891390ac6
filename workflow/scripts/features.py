# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.features import features
from mechflow.workflow import run_rule

run_rule(snakemake, features)  # noqa: F821 (injected by Snakemake)
