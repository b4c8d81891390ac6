"""Exact-patching reference and the ROC AUC of every attribution method against it (issue 4)."""

from mechflow.benchmark.roc import roc_auc, roc_curve
from mechflow.reference.auc import positives
from mechflow.reference.config import PositivesConfig, ReferenceConfig, exact_settings
from mechflow.reference.edges import (
           edge_reference,
           exact_edge_effects,
           read_edge_reference,
)
from mechflow.reference.sampling import stratified_sample
from mechflow.reference.stage import reference

__all__ = ["PositivesConfig", "ReferenceConfig", "exact_edge_effects", "exact_settings", "positives",
           "read_edge_reference", "roc_auc", "roc_curve", "edge_reference", "reference",
           "stratified_sample"]
