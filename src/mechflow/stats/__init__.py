"""Statistics on tables/arrays: bootstrap CIs, ranking stability, FCAS, CKA (cross-model SAE feature
matching is in `mechflow.features`).

The stages: `stats` (rule `stats`) and `cross_model` (rule `cross_model`), in `mechflow.stats.stage`.
"""

from mechflow.stats.bootstrap import (
    BootstrapResult,
    bootstrap,
    bootstrap_faithfulness,
    bootstrap_mean_functional,
    bootstrap_means,
    confidence_intervals,
    resample_counts,
    resample_indices,
)
from mechflow.stats.cka import DepthCKA, cka_by_depth, hsic_cka, linear_cka
from mechflow.stats.config import StatsConfig
from mechflow.stats.fcas import FCASResult, ModelComponents, fcas_score, fcas_test, permutation_null
from mechflow.stats.output import (
    forest_plot,
    matrix_heatmap,
    null_histogram,
    summarize_bootstrap,
    summarize_bootstrap_stability,
    summarize_cka,
    summarize_fcas,
    summarize_pairwise_stability,
    write_table,
)
from mechflow.stats.stability import (
    BootstrapStability,
    PairwiseStability,
    bootstrap_rank_stability,
    kendall_tau_b,
    pairwise_stability,
    top_k_jaccard,
    top_k_set,
)
from mechflow.stats.stage import cross_model, stats

__all__ = [
    "BootstrapResult", "bootstrap", "bootstrap_faithfulness", "bootstrap_mean_functional", "bootstrap_means",
    "confidence_intervals", "resample_counts", "resample_indices",
    "DepthCKA", "cka_by_depth", "hsic_cka", "linear_cka", "StatsConfig",
    "FCASResult", "ModelComponents", "fcas_score", "fcas_test", "permutation_null",
    "forest_plot", "matrix_heatmap", "null_histogram", "summarize_bootstrap", "summarize_bootstrap_stability",
    "summarize_cka", "summarize_fcas", "summarize_pairwise_stability", "write_table",
    "BootstrapStability", "PairwiseStability", "bootstrap_rank_stability", "kendall_tau_b",
    "pairwise_stability", "top_k_jaccard", "top_k_set",
    "cross_model", "stats",
]
