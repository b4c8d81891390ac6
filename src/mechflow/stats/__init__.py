"""Statistics on tables/arrays: bootstrap CIs, ranking stability, FCAS, CKA, feature matching."""

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
from mechflow.stats.feature_matching import FeatureMatching, correlation_matrix, match_features, shared_vocabulary
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
from mechflow.stats.stage import run_cross_model, run_statistics

__all__ = [
    "BootstrapResult", "bootstrap", "bootstrap_faithfulness", "bootstrap_mean_functional", "bootstrap_means",
    "confidence_intervals", "resample_counts", "resample_indices",
    "DepthCKA", "cka_by_depth", "hsic_cka", "linear_cka", "StatsConfig",
    "FCASResult", "ModelComponents", "fcas_score", "fcas_test", "permutation_null",
    "FeatureMatching", "correlation_matrix", "match_features", "shared_vocabulary",
    "forest_plot", "matrix_heatmap", "null_histogram", "summarize_bootstrap", "summarize_bootstrap_stability",
    "summarize_cka", "summarize_fcas", "summarize_pairwise_stability", "write_table",
    "BootstrapStability", "PairwiseStability", "bootstrap_rank_stability", "kendall_tau_b",
    "pairwise_stability", "top_k_jaccard", "top_k_set",
    "run_cross_model", "run_statistics",
]
