# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.benchmark.compare import run_benchmark
from mechflow.workflow import run_rule

run_rule(snakemake, run_benchmark)  # noqa: F821 (injected by Snakemake)
