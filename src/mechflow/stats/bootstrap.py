"""Bootstrap confidence intervals over prompts: percentile and BCa, for many statistics at once.

Efron & Tibshirani (1993), *An Introduction to the Bootstrap*, ch. 13 (percentile) and 14.3
(BCa, eq. 14.9-14.15). The resampling unit is the prompt: every statistic computed here is a
function of per-prompt quantities, so one resample of prompt indices serves all of them.

Algorithm (vectorised path, `bootstrap_means` / `bootstrap_mean_functional`):
    1. Draw prompt indices once, `idx = rng.integers(0, n, size=(B, n))` (the same call
       `scipy.stats.bootstrap` makes, so both see identical resamples for the same seed).
    2. Turn them into a count matrix `W[b, i] = #{j : idx[b, j] = i}`; the resampled column means
       are `W @ X / n` (one matrix product for all B resamples and all columns).
    3. Apply the (vectorised) statistic `fn` to the [B, q] resampled means -> [B, p].
    4. Jackknife: leave-one-out means `(sum(X) - X_i) / (n - 1)` -> `fn` -> [n, p].
    5. Percentile interval: the alpha/2 and 1 - alpha/2 quantiles of the bootstrap
       distribution (linear interpolation, as numpy/scipy).
    6. BCa interval: bias correction z0 = Phi^-1(#{theta*_b < theta} + 0.5 #{theta*_b = theta}) / B);
       acceleration a = sum(d_i^3) / (6 (sum d_i^2)^1.5) with d_i = mean(theta_(.)) - theta_(i)
       from the jackknife; the interval is the bootstrap quantiles at
       Phi(z0 + (z0 + z_q) / (1 - a (z0 + z_q))) for z_q = Phi^-1(alpha/2), Phi^-1(1 - alpha/2).

`bootstrap(stat_fn, data, ...)` is the generic path for statistics that are not functions of
column means (medians, rank correlations, ...): it recomputes `stat_fn` on each of the B
resamples and each of the n jackknife samples in a Python loop, so it is O(B + n) calls
and much slower than the vectorised path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy.special import ndtr, ndtri

from mechflow.errors import DataError
from mechflow.stats.checks import as_rng, check_choices, check_ci_level, check_positive_int, finite_array
from mechflow.stats.config import CI_METHODS

logger = logging.getLogger(__name__)

MeanFunctional = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class BootstrapResult:
    """Point estimates, bootstrap distribution and intervals for p statistics.

    Attributes:
        estimate: [p] statistic on the full sample.
        distribution: [B, p] statistic on each bootstrap resample.
        standard_error: [p] sample std (ddof=1) of `distribution`.
        intervals: method name ("percentile", "bca") -> [p, 2] array of (low, high).
        ci_level: nominal coverage, e.g. 0.95.
        z0: [p] BCa bias correction (NaN if BCa was not requested).
        acceleration: [p] BCa acceleration (NaN if BCa was not requested).
        n: number of prompts resampled.
    """

    estimate: np.ndarray
    distribution: np.ndarray
    standard_error: np.ndarray
    intervals: dict[str, np.ndarray]
    ci_level: float
    z0: np.ndarray
    acceleration: np.ndarray
    n: int
    seed: int | None = None
    names: list[str] | None = field(default=None)

    @property
    def B(self) -> int:
        return int(self.distribution.shape[0])

    def ci(self, method: str = "bca") -> np.ndarray:
        """[p, 2] interval for `method` (KeyError names the methods computed)."""
        if method not in self.intervals:
            raise KeyError(f"interval {method!r} not computed; have {sorted(self.intervals)}")
        return self.intervals[method]


def _check_common(B: int, ci_level: float, methods: Sequence[str]) -> tuple[str, ...]:
    check_positive_int("stats.B", B)
    check_ci_level("stats.ci_level", ci_level)
    return check_choices("stats.ci_methods", methods, CI_METHODS)


def resample_indices(n: int, B: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """[B, n] prompt indices drawn with replacement (same draw order as `scipy.stats.bootstrap`)."""
    check_positive_int("stats.B", B)
    if n < 1:
        raise DataError(f"bootstrap data: need at least one prompt, got n={n}")
    return as_rng(seed).integers(0, n, size=(B, n))


def resample_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """[B, n] count matrix: how often each prompt appears in each resample (rows sum to n)."""
    B = indices.shape[0]
    flat = (indices + n * np.arange(B)[:, None]).ravel()
    return np.bincount(flat, minlength=B * n).reshape(B, n).astype(np.float64)


def _quantiles_per_column(sorted_boot: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Linear-interpolation quantile of each column at its own level `q[j]` (numpy 'linear')."""
    B, p = sorted_boot.shape
    out = np.full(p, np.nan)
    ok = np.isfinite(q)
    if not ok.any():
        return out
    pos = np.clip(q[ok], 0.0, 1.0) * (B - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, B - 1)
    frac = pos - lo
    cols = np.nonzero(ok)[0]
    a = sorted_boot[lo, cols]
    b = sorted_boot[hi, cols]
    # numpy's lerp form: exact at frac == 0 even when b is +-inf
    out[ok] = np.where(frac == 0, a, a + (b - a) * frac)
    return out


def confidence_intervals(
    distribution: np.ndarray,
    estimate: np.ndarray,
    jackknife: np.ndarray | None,
    ci_level: float = 0.95,
    methods: Sequence[str] = CI_METHODS,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Percentile and/or BCa intervals from a bootstrap distribution.

    Args:
        distribution: [B, p] bootstrap statistics.
        estimate: [p] statistic on the full sample.
        jackknife: [n, p] leave-one-out statistics (needed for BCa).
        ci_level: nominal two-sided coverage.
        methods: subset of ("percentile", "bca").

    Returns:
        (intervals, z0, acceleration): intervals maps method -> [p, 2].
    """
    methods = _check_common(max(1, distribution.shape[0]), ci_level, methods)
    alpha = 1.0 - ci_level
    B, p = distribution.shape
    sorted_boot = np.sort(distribution, axis=0)  # NaNs sort last; they make the affected quantiles NaN below
    has_nan = np.isnan(distribution).any(axis=0)
    intervals: dict[str, np.ndarray] = {}
    z0 = np.full(p, np.nan)
    accel = np.full(p, np.nan)
    if "percentile" in methods:
        lo = _quantiles_per_column(sorted_boot, np.full(p, alpha / 2))
        hi = _quantiles_per_column(sorted_boot, np.full(p, 1 - alpha / 2))
        intervals["percentile"] = np.stack([lo, hi], axis=1)
    if "bca" in methods:
        if jackknife is None:
            raise ValueError("BCa needs jackknife statistics")
        below = (distribution < estimate).sum(axis=0) + 0.5 * (distribution == estimate).sum(axis=0)
        with np.errstate(divide="ignore"):
            z0 = ndtri(below / B)
        d = jackknife.mean(axis=0) - jackknife
        num = (d**3).sum(axis=0)
        den = 6.0 * ((d**2).sum(axis=0)) ** 1.5
        # constant jackknife (e.g. a constant column): no skewness to correct
        accel = np.divide(num, den, out=np.zeros(p), where=den > 0)
        z_lo, z_hi = ndtri(alpha / 2), ndtri(1 - alpha / 2)
        with np.errstate(invalid="ignore", divide="ignore"):
            a1 = ndtr(z0 + (z0 + z_lo) / (1 - accel * (z0 + z_lo)))
            a2 = ndtr(z0 + (z0 + z_hi) / (1 - accel * (z0 + z_hi)))
        lo = _quantiles_per_column(sorted_boot, a1)
        hi = _quantiles_per_column(sorted_boot, a2)
        intervals["bca"] = np.stack([lo, hi], axis=1)
        degenerate = ~np.isfinite(z0)
        if degenerate.any():
            logger.warning(
                "BCa undefined for %d statistic(s) (observed value outside the bootstrap "
                "distribution); their BCa interval is NaN", int(degenerate.sum()))
    for name, iv in intervals.items():
        iv[has_nan] = np.nan
    if has_nan.any():
        logger.warning("%d statistic(s) were NaN on some resample (e.g. a ratio with a zero "
                       "denominator); their intervals are NaN", int(has_nan.sum()))
    return intervals, z0, accel


def bootstrap_mean_functional(
    X: np.ndarray,
    fn: MeanFunctional | None = None,
    *,
    B: int = 1000,
    seed: int | np.random.Generator = 0,
    ci_level: float = 0.95,
    methods: Sequence[str] = CI_METHODS,
    indices: np.ndarray | None = None,
    names: Sequence[str] | None = None,
) -> BootstrapResult:
    """Bootstrap a statistic that is a function of per-prompt column means.

    Args:
        X: [n_prompts, q] per-prompt values (e.g. per-prompt attribution scores or metric columns).
        fn: vectorised map from means [..., q] to statistics [..., p]; identity (plain means) if None.
        B: number of bootstrap resamples.
        seed: seed or Generator for the prompt resampling.
        ci_level: nominal two-sided coverage of the intervals.
        methods: which intervals to compute ("percentile", "bca").
        indices: optional precomputed [B, n] resample indices (overrides `B` and `seed`), so
            several calls can share one resampling.
        names: optional labels of the p statistics (carried into the result).

    Returns:
        A `BootstrapResult` with p statistics.
    """
    X = finite_array("bootstrap data X [n_prompts, n_columns]", X, (1, 2))
    if X.ndim == 1:
        X = X[:, None]
    n = X.shape[0]
    if indices is None:
        indices = resample_indices(n, B, seed)
    else:
        indices = np.asarray(indices)
        if indices.ndim != 2 or indices.shape[1] != n:
            raise DataError(f"bootstrap indices: expected shape [B, {n}], got {indices.shape}")
    B = indices.shape[0]
    methods = _check_common(B, ci_level, methods)
    fn = fn or (lambda m: m)
    W = resample_counts(indices, n)
    boot_means = W @ X / n
    with np.errstate(divide="ignore", invalid="ignore"):
        estimate = np.atleast_1d(np.asarray(fn(X.mean(axis=0)), dtype=np.float64))
        distribution = np.asarray(fn(boot_means), dtype=np.float64).reshape(B, -1)
        jackknife = None
        if "bca" in methods:
            if n < 2:
                raise DataError("bootstrap data: BCa needs at least 2 prompts for the jackknife")
            loo = (X.sum(axis=0) - X) / (n - 1)
            jackknife = np.asarray(fn(loo), dtype=np.float64).reshape(n, -1)
    if distribution.shape[1] != estimate.shape[0]:
        raise ValueError(f"fn returned {estimate.shape[0]} statistics on the full sample but "
                         f"{distribution.shape[1]} per resample; it must be vectorised over leading axes")
    intervals, z0, accel = confidence_intervals(distribution, estimate, jackknife, ci_level, methods)
    se = distribution.std(axis=0, ddof=1) if B > 1 else np.full(estimate.shape, np.nan)
    seed_val = seed if isinstance(seed, (int, np.integer)) else None
    return BootstrapResult(estimate, distribution, se, intervals, float(ci_level), z0, accel, n,
                           seed_val, list(names) if names is not None else None)


def bootstrap_means(X: np.ndarray, **kwargs) -> BootstrapResult:
    """Intervals for the column means of X [n_prompts, n_components] (see `bootstrap_mean_functional`)."""
    return bootstrap_mean_functional(X, None, **kwargs)


def faithfulness_fn(n_circuits: int) -> MeanFunctional:
    """fn for columns [m_C_1..m_C_c, m_N, m_empty]: f_j = (m_C_j - m_empty) / (m_N - m_empty)."""

    def fn(means: np.ndarray) -> np.ndarray:
        m_c = means[..., :n_circuits]
        m_n = means[..., n_circuits : n_circuits + 1]
        m_0 = means[..., n_circuits + 1 : n_circuits + 2]
        return (m_c - m_0) / (m_n - m_0)

    return fn


def bootstrap_faithfulness(
    m_circuit: np.ndarray, m_full: np.ndarray, m_empty: np.ndarray, **kwargs
) -> BootstrapResult:
    """Bootstrap the normalized faithfulness f = (mean m_C - mean m_empty) / (mean m_N - mean m_empty).

    f is a ratio of means over prompts (MIB; Conmy et al. 2023), so numerator and denominator
    are resampled together: the same prompts enter both on every resample.

    Args:
        m_circuit: [n_prompts] or [n_prompts, n_circuits] task metric with only the circuit(s) kept.
        m_full: [n_prompts] metric of the full model N.
        m_empty: [n_prompts] metric of the empty circuit (everything patched).
        **kwargs: passed to `bootstrap_mean_functional` (B, seed, ci_level, methods, indices, names).
    """
    mc = finite_array("m_circuit", m_circuit, (1, 2))
    mc = mc[:, None] if mc.ndim == 1 else mc
    mn = finite_array("m_full", m_full, 1)
    m0 = finite_array("m_empty", m_empty, 1)
    if not (mc.shape[0] == mn.shape[0] == m0.shape[0]):
        raise DataError(f"faithfulness metrics: m_circuit, m_full, m_empty must have one row per prompt; "
                        f"got {mc.shape[0]}, {mn.shape[0]}, {m0.shape[0]}")
    if np.isclose(mn.mean(), m0.mean()):
        raise DataError("faithfulness metrics: mean m_full equals mean m_empty, so f is undefined "
                        "(the corruption does not change the metric; choose another corrupted prompt set)")
    X = np.concatenate([mc, mn[:, None], m0[:, None]], axis=1)
    return bootstrap_mean_functional(X, faithfulness_fn(mc.shape[1]), **kwargs)


def bootstrap(
    stat_fn: Callable[[np.ndarray], np.ndarray | float],
    data: np.ndarray,
    *,
    B: int = 1000,
    seed: int | np.random.Generator = 0,
    ci_level: float = 0.95,
    methods: Sequence[str] = CI_METHODS,
    indices: np.ndarray | None = None,
    names: Sequence[str] | None = None,
) -> BootstrapResult:
    """Generic bootstrap: recompute `stat_fn` exactly on every resample (slow path).

    Use this for statistics that are not functions of column means (median, trimmed mean,
    rank correlations, ...). It calls `stat_fn` B + n times in a Python loop; prefer
    `bootstrap_mean_functional` whenever the statistic is a function of means.

    Args:
        stat_fn: maps data rows [m, ...] to a scalar or a [p] vector.
        data: [n_prompts, ...] array; rows (prompts) are resampled.
        B, seed, ci_level, methods, indices, names: as in `bootstrap_mean_functional`.
    """
    arr = np.asarray(data.detach().cpu().numpy() if hasattr(data, "detach") else data)
    if arr.ndim == 0 or arr.shape[0] < 1:
        raise DataError(f"bootstrap data: expected rows of prompts, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.number):
        finite_array("bootstrap data", arr, tuple(range(1, max(arr.ndim, 1) + 1)))
    n = arr.shape[0]
    if indices is None:
        indices = resample_indices(n, B, seed)
    B = indices.shape[0]
    methods = _check_common(B, ci_level, methods)

    def stat(rows: np.ndarray) -> np.ndarray:
        return np.atleast_1d(np.asarray(stat_fn(rows), dtype=np.float64)).ravel()

    estimate = stat(arr)
    distribution = np.stack([stat(arr[idx]) for idx in indices])
    jackknife = None
    if "bca" in methods:
        if n < 2:
            raise DataError("bootstrap data: BCa needs at least 2 prompts for the jackknife")
        keep = ~np.eye(n, dtype=bool)
        jackknife = np.stack([stat(arr[keep[i]]) for i in range(n)])
    intervals, z0, accel = confidence_intervals(distribution, estimate, jackknife, ci_level, methods)
    se = distribution.std(axis=0, ddof=1) if B > 1 else np.full(estimate.shape, np.nan)
    seed_val = seed if isinstance(seed, (int, np.integer)) else None
    return BootstrapResult(estimate, distribution, se, intervals, float(ci_level), z0, accel, n,
                           seed_val, list(names) if names is not None else None)
