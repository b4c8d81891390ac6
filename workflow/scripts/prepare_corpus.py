# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.corpus import prepare_corpus
from mechflow.workflow import run_rule

run_rule(snakemake, prepare_corpus)  # noqa: F821 (injected by Snakemake)
