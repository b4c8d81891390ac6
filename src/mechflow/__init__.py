"""mechflow: a Snakemake + Hydra pipeline for mechanistic interpretability."""

__version__ = "0.1.0"
