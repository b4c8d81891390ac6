"""The report stage: EU AI Act Annex IV-structured technical documentation of a run (PDF, JSON, Markdown)."""

from mechflow.report.stage import report

__all__ = ["report"]
