"""Bootstrap intervals: exact agreement with scipy on identical resamples, coverage, errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st

from mechflow.errors import ConfigError, DataError
from mechflow.stats.bootstrap import (
    bootstrap,
    bootstrap_faithfulness,
    bootstrap_means,
    resample_counts,
    resample_indices,
)


def test_count_matrix_means_equal_index_gathers():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(23, 7))
    idx = resample_indices(23, 50, seed=3)
    W = resample_counts(idx, 23)
    assert W.shape == (50, 23) and np.all(W.sum(axis=1) == 23)
    np.testing.assert_allclose(W @ X / 23, X[idx].mean(axis=1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["percentile", "BCa"])
def test_means_match_scipy_on_identical_resamples(method):
    # scipy.stats.bootstrap draws rng.integers(0, n, (B, n)) from the Generator it is given,
    # exactly as resample_indices does, so with the same seed both see the same resamples and
    # the intervals agree to rounding (the sum order of the means differs).
    rng = np.random.default_rng(1)
    X = rng.exponential(size=(40, 4)) ** 1.5
    ours = bootstrap_means(X, B=2000, seed=5)
    key = "bca" if method == "BCa" else "percentile"
    for j in range(X.shape[1]):
        ref = st.bootstrap((X[:, j],), np.mean, n_resamples=2000, method=method,
                           rng=np.random.default_rng(5))
        np.testing.assert_allclose(ours.ci(key)[j], [ref.confidence_interval.low, ref.confidence_interval.high],
                                   rtol=1e-9)
        np.testing.assert_allclose(ours.standard_error[j], ref.standard_error, rtol=1e-9)


def test_faithfulness_ratio_matches_scipy_paired_bca():
    rng = np.random.default_rng(2)
    n = 60
    m_empty = rng.normal(0.0, 1.0, n)
    m_full = m_empty + rng.gamma(2.0, 1.5, n)
    m_circ = m_empty + 0.7 * (m_full - m_empty) + rng.normal(0, 0.5, n)
    ours = bootstrap_faithfulness(m_circ, m_full, m_empty, B=1500, seed=11)
    f_hat = (m_circ.mean() - m_empty.mean()) / (m_full.mean() - m_empty.mean())
    assert ours.estimate[0] == pytest.approx(f_hat, rel=1e-12)

    def f(c, full, empty, axis=-1):
        return (c.mean(axis) - empty.mean(axis)) / (full.mean(axis) - empty.mean(axis))

    ref = st.bootstrap((m_circ, m_full, m_empty), f, paired=True, vectorized=True, n_resamples=1500,
                       method="BCa", rng=np.random.default_rng(11))
    np.testing.assert_allclose(ours.ci("bca")[0], [ref.confidence_interval.low, ref.confidence_interval.high],
                               rtol=1e-9)


def test_several_circuits_share_resamples():
    rng = np.random.default_rng(3)
    n = 30
    m0, mn = rng.normal(size=n), rng.normal(size=n) + 3
    mc = np.stack([m0 + 0.5 * (mn - m0), m0 + 0.9 * (mn - m0)], axis=1) + rng.normal(0, 0.1, (n, 2))
    both = bootstrap_faithfulness(mc, mn, m0, B=300, seed=4)
    for j in range(2):
        one = bootstrap_faithfulness(mc[:, j], mn, m0, B=300, seed=4)
        np.testing.assert_allclose(both.distribution[:, j], one.distribution[:, 0], rtol=1e-12)
        np.testing.assert_allclose(both.ci("bca")[j], one.ci("bca")[0], rtol=1e-12)


def test_acceleration_and_bias_correction_match_their_definitions():
    rng = np.random.default_rng(4)
    x = rng.lognormal(size=35)
    res = bootstrap_means(x, B=500, seed=0)
    d = x - x.mean()
    # jackknife of the mean: theta_(.) - theta_(i) = (x_i - xbar) / (n - 1); the (n-1) cancels
    assert res.acceleration[0] == pytest.approx((d**3).sum() / (6 * (d**2).sum() ** 1.5), rel=1e-10)
    boot = res.distribution[:, 0]
    frac = ((boot < x.mean()).sum() + 0.5 * (boot == x.mean()).sum()) / boot.size
    assert res.z0[0] == pytest.approx(st.norm.ppf(frac), rel=1e-12)


def test_generic_bootstrap_equals_vectorised_path_for_the_mean():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(25, 3))
    fast = bootstrap_means(X, B=200, seed=9)
    slow = bootstrap(lambda rows: rows.mean(axis=0), X, B=200, seed=9)
    np.testing.assert_allclose(slow.distribution, fast.distribution, rtol=1e-12)
    for m in ("percentile", "bca"):
        np.testing.assert_allclose(slow.ci(m), fast.ci(m), rtol=1e-12)


def test_generic_bootstrap_median_matches_scipy():
    x = np.random.default_rng(6).exponential(size=31)
    ours = bootstrap(np.median, x, B=999, seed=2)
    ref = st.bootstrap((x,), np.median, n_resamples=999, method="BCa", rng=np.random.default_rng(2))
    np.testing.assert_allclose(ours.ci("bca")[0], [ref.confidence_interval.low, ref.confidence_interval.high],
                               rtol=1e-12)


def test_constant_column_has_a_point_interval():
    X = np.column_stack([np.full(20, 2.5), np.arange(20.0)])
    res = bootstrap_means(X, B=100, seed=0)
    for m in ("percentile", "bca"):
        assert res.ci(m)[0].tolist() == [2.5, 2.5]
        assert res.ci(m)[1, 0] < 9.5 < res.ci(m)[1, 1]


def _coverage(draw, mu, n, reps_per_chunk=100, chunks=20, seed=123):
    hits = {"percentile": 0, "bca": 0}
    g = np.random.default_rng(seed)
    for c in range(chunks):
        # each column is an independent data set; every chunk draws fresh resample indices
        res = bootstrap_means(draw(g, (n, reps_per_chunk)), B=1000, seed=1000 + c)
        for m in hits:
            iv = res.ci(m)
            hits[m] += int(((iv[:, 0] <= mu) & (mu <= iv[:, 1])).sum())
    return {m: h / (reps_per_chunk * chunks) for m, h in hits.items()}


def test_coverage_of_95_intervals_on_a_skewed_distribution():
    # Exponential(1) (skewness 2), n=50 prompts, 20 000 independent data sets, B=1000 each.
    # Measured with this seed: percentile 0.9308, BCa 0.9354 (Monte Carlo SE ~0.0018), so both
    # undercover by 1.5-2 points but lie inside the +-3 point band; BCa is the closer one.
    # (Heavier skew fails the band at n=50: lognormal(0,1) gives 0.892 / 0.903; see the report.)
    cov = _coverage(lambda g, s: g.exponential(size=s), 1.0, n=50, reps_per_chunk=200, chunks=100)
    for m, c in cov.items():
        assert abs(c - 0.95) <= 0.03, (m, c)
    assert cov["bca"] > cov["percentile"]


@pytest.mark.parametrize(
    ("kwargs", "exc", "field"),
    [({"B": 0}, ConfigError, "stats.B"), ({"ci_level": 1.0}, ConfigError, "stats.ci_level"),
     ({"ci_level": -0.1}, ConfigError, "stats.ci_level"), ({"methods": ["normal"]}, ConfigError, "stats.ci_methods"),
     ({"seed": -3}, ConfigError, "stats.seed")],
)
def test_bad_settings_name_the_field(kwargs, exc, field):
    with pytest.raises(exc, match=field.replace(".", r"\.")):
        bootstrap_means(np.ones((5, 2)), **kwargs)


def test_nan_scores_raise_data_error_with_position():
    X = np.ones((5, 2))
    X[3, 1] = np.nan
    with pytest.raises(DataError, match=r"NaN/inf.*\(3, 1\)"):
        bootstrap_means(X, B=10)


def test_faithfulness_with_no_corruption_effect_is_rejected():
    x = np.arange(10.0)
    with pytest.raises(DataError, match="m_full equals mean m_empty"):
        bootstrap_faithfulness(x, x, x, B=10)
