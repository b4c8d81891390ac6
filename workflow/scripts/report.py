# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.report import report
from mechflow.workflow import run_rule

run_rule(snakemake, report)  # noqa: F821 (injected by Snakemake)
