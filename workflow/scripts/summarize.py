# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.summary import summarize
from mechflow.workflow import run_rule

run_rule(snakemake, summarize)  # noqa: F821 (injected by Snakemake)
