"""Benchmark stage: ACDC (Conmy et al. 2023) on the MIB edge graph, restricted edge graphs shared by
every method, and the timings/ROC inputs of the method comparison."""

from mechflow.benchmark.acdc import Acdc, AcdcRun, AcdcStep, receiver_order, roc_points
from mechflow.benchmark.config import (
    AcdcConfig,
    BenchmarkConfig,
    RestrictionConfig,
    check_thresholds,
)
from mechflow.benchmark.core import run_acdc, select_batch
from mechflow.benchmark.metrics import AcdcMetric, kl_to_clean
from mechflow.benchmark.restriction import EdgeRestriction
from mechflow.benchmark.resume import ResumableForward

__all__ = [
    "Acdc", "AcdcConfig", "AcdcMetric", "AcdcRun", "AcdcStep", "BenchmarkConfig", "EdgeRestriction",
    "RestrictionConfig", "ResumableForward", "check_thresholds", "kl_to_clean", "receiver_order", "roc_points",
    "run_acdc", "select_batch",
]
