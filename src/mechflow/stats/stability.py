"""Ranking stability of component scores: Kendall tau-b and top-k Jaccard overlap.

A circuit claim is only as good as the ranking it rests on. This module asks how much the
ranking of components moves when (a) the prompts are resampled, (b) the attribution method
changes, (c) the prompt template changes.

Steps:
    1. Rank agreement between two score vectors: Kendall's tau-b, which corrects for ties
       (Kendall 1945; `scipy.stats.kendalltau`, variant "b", its default):
       tau_b = (C - D) / sqrt((n0 - n1)(n0 - n2)), n0 = n(n-1)/2, n1/n2 = tied pairs in x/y.
    2. Top-k overlap: Jaccard |A ∩ B| / |A ∪ B| of the k components with the largest |score|
       (or largest signed score with `by_abs=False`). Ties at the k-th place are broken by the
       lower component index (stable sort), so the result is deterministic.
    3. Bootstrap stability: resample prompts (same index draw as `bootstrap.py`), recompute the
       mean score per component, and compare each resampled ranking with the full-sample one.
    4. Cross-method / cross-template stability: all pairs of a dict name -> score vector; the
       distribution of off-diagonal values is summarised by quantiles.

A constant score vector has no ranking: tau is undefined and returned as NaN (scipy's
convention), and NaNs are left out of the quantile summaries (their count is reported).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy.stats import kendalltau

from mechflow.errors import DataError
from mechflow.stats.bootstrap import resample_counts, resample_indices
from mechflow.stats.checks import check_top_k, finite_array

logger = logging.getLogger(__name__)

DEFAULT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b between two score vectors of equal length (NaN if either is constant)."""
    x = finite_array("scores x", x, 1)
    y = finite_array("scores y", y, 1)
    if x.shape != y.shape:
        raise DataError(f"kendall_tau_b: score vectors differ in length ({x.size} vs {y.size}); "
                        "they must score the same components in the same order")
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(kendalltau(x, y, variant="b").statistic)


def top_k_set(scores: np.ndarray, k: int, *, by_abs: bool = True) -> np.ndarray:
    """Indices of the k largest scores (by |score| if `by_abs`); ties -> lower index first."""
    s = finite_array("scores", scores, 1)
    k = check_top_k("stats.top_k", k, s.size)
    key = -np.abs(s) if by_abs else -s
    return np.sort(np.argsort(key, kind="stable")[:k])


def top_k_jaccard(x: np.ndarray, y: np.ndarray, k: int, *, by_abs: bool = True) -> float:
    """Jaccard overlap |A ∩ B| / |A ∪ B| of the top-k component sets of x and y."""
    a = set(top_k_set(x, k, by_abs=by_abs).tolist())
    b = set(top_k_set(y, k, by_abs=by_abs).tolist())
    return len(a & b) / len(a | b)


def summarize(values: np.ndarray, quantiles: Sequence[float] = DEFAULT_QUANTILES) -> dict[str, float]:
    """Mean, quantiles, count and NaN count of a 1-D distribution (NaNs excluded)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    ok = v[np.isfinite(v)]
    out: dict[str, float] = {"n": int(ok.size), "n_nan": int(v.size - ok.size)}
    out["mean"] = float(ok.mean()) if ok.size else float("nan")
    for q in quantiles:
        out[f"q{q:g}"] = float(np.quantile(ok, q)) if ok.size else float("nan")
    return out


@dataclass(frozen=True)
class BootstrapStability:
    """Per-resample agreement of bootstrap rankings with the full-sample ranking.

    Attributes:
        tau: [B] Kendall tau-b between resampled mean scores and full-sample mean scores.
        jaccard: [B] top-k Jaccard overlap with the full-sample top-k.
        k: top-k size used.
        tau_summary / jaccard_summary: `summarize` of each distribution.
        selection_frequency: [n_components] fraction of resamples in which each component is in the top-k.
    """

    tau: np.ndarray
    jaccard: np.ndarray
    k: int
    tau_summary: dict[str, float]
    jaccard_summary: dict[str, float]
    selection_frequency: np.ndarray


def bootstrap_rank_stability(
    contributions: np.ndarray,
    *,
    k: int,
    B: int = 1000,
    seed: int | np.random.Generator = 0,
    by_abs: bool = True,
    indices: np.ndarray | None = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
) -> BootstrapStability:
    """Stability of the component ranking under prompt resampling.

    Args:
        contributions: [n_prompts, n_components] per-prompt scores; the ranking is by mean score.
        k: top-k size for the Jaccard overlap.
        B: number of bootstrap resamples; seed: their seed (ignored if `indices` is given).
        by_abs: rank by |mean score| (attribution magnitude) rather than signed mean for top-k
            and tau.
        indices: optional [B, n] resample indices shared with `bootstrap_means`.
        quantiles: levels of the reported quantiles.
    """
    X = finite_array("contributions [n_prompts, n_components]", contributions, 2)
    n, p = X.shape
    k = check_top_k("stats.top_k", k, p)
    if indices is None:
        indices = resample_indices(n, B, seed)
    boot = resample_counts(indices, n) @ X / n
    full = X.mean(axis=0)
    if by_abs:
        boot, full = np.abs(boot), np.abs(full)
    ref_top = top_k_set(full, k, by_abs=False)
    ref_set = set(ref_top.tolist())
    taus = np.empty(boot.shape[0])
    jac = np.empty(boot.shape[0])
    freq = np.zeros(p)
    for b, row in enumerate(boot):
        taus[b] = kendall_tau_b(row, full)
        top = top_k_set(row, k, by_abs=False)
        freq[top] += 1
        s = set(top.tolist())
        jac[b] = len(s & ref_set) / len(s | ref_set)
    return BootstrapStability(taus, jac, k, summarize(taus, quantiles), summarize(jac, quantiles),
                              freq / boot.shape[0])


@dataclass(frozen=True)
class PairwiseStability:
    """Agreement between every pair of named score vectors (methods or templates).

    Attributes:
        names: the vector names, in matrix order.
        tau: [m, m] Kendall tau-b matrix (diagonal 1).
        jaccard: [m, m] top-k Jaccard matrix (diagonal 1).
        k: top-k size.
        tau_summary / jaccard_summary: `summarize` over the m(m-1)/2 off-diagonal pairs.
    """

    names: list[str]
    tau: np.ndarray
    jaccard: np.ndarray
    k: int
    tau_summary: dict[str, float]
    jaccard_summary: dict[str, float]


def pairwise_stability(
    scores: Mapping[str, np.ndarray],
    *,
    k: int,
    by_abs: bool = True,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
) -> PairwiseStability:
    """Tau-b and top-k Jaccard for all pairs of score vectors over the same components.

    Use with method -> scores (cross-method stability) or template -> scores (cross-template).
    With `by_abs`, tau compares the rankings of |score|, matching how components are selected.
    """
    if len(scores) < 2:
        raise DataError(f"pairwise_stability: need at least 2 score vectors, got {len(scores)} ({list(scores)})")
    names = list(scores)
    vecs = [finite_array(f"scores[{name!r}]", scores[name], 1) for name in names]
    sizes = {v.size for v in vecs}
    if len(sizes) != 1:
        raise DataError(f"pairwise_stability: score vectors differ in length "
                        f"({dict(zip(names, [v.size for v in vecs]))}); they must cover the same components")
    k = check_top_k("stats.top_k", k, vecs[0].size)
    ranked = [np.abs(v) if by_abs else v for v in vecs]
    m = len(names)
    tau = np.eye(m)
    jac = np.eye(m)
    for i, j in itertools.combinations(range(m), 2):
        tau[i, j] = tau[j, i] = kendall_tau_b(ranked[i], ranked[j])
        jac[i, j] = jac[j, i] = top_k_jaccard(ranked[i], ranked[j], k, by_abs=False)
    iu = np.triu_indices(m, 1)
    return PairwiseStability(names, tau, jac, k, summarize(tau[iu], quantiles), summarize(jac[iu], quantiles))
