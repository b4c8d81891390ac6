"""End-of-run summary: task baselines and harvest statistics in one table, and one figure."""

from mechflow.summary.core import summarize

__all__ = ["summarize"]
