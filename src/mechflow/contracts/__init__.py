"""Data contracts: every file format mechflow writes is defined here and nowhere else."""
