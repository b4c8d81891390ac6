# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.benchmark.stage import benchmark
from mechflow.workflow import run_rule

run_rule(snakemake, benchmark)  # noqa: F821 (injected by Snakemake)
