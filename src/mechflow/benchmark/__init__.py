"""Benchmark stage: ACDC (Conmy et al. 2023) on the MIB edge graph, restricted edge graphs shared by
every method, and the side-by-side comparison of ACDC, EAP, EAP-IG, our circuit search and exhaustive
patching (rule ``benchmark``, stage function `benchmark`)."""

from mechflow.benchmark.acdc import Acdc, AcdcRun, AcdcStep, receiver_order, roc_points
from mechflow.benchmark.config import (
    AcdcConfig,
    BenchmarkConfig,
    RestrictionConfig,
    check_thresholds,
)
from mechflow.benchmark.core import run_acdc, select_batch
from mechflow.benchmark.metrics import AcdcMetric, kl_to_clean
from mechflow.benchmark.report import benchmark_outputs
from mechflow.benchmark.restriction import EdgeRestriction
from mechflow.benchmark.resume import ResumableForward
from mechflow.benchmark.stage import benchmark

__all__ = [
    "Acdc", "AcdcConfig", "AcdcMetric", "AcdcRun", "AcdcStep", "BenchmarkConfig", "EdgeRestriction",
    "RestrictionConfig", "ResumableForward", "benchmark", "benchmark_outputs", "check_thresholds", "kl_to_clean",
    "receiver_order", "roc_points", "run_acdc", "select_batch",
]
