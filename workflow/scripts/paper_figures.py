# Snakemake adapter: the rule's named inputs, outputs and params become keyword arguments.
from mechflow.report.figures import paper_figures
from mechflow.workflow import run_rule

run_rule(snakemake, paper_figures)  # noqa: F821 (injected by Snakemake)
