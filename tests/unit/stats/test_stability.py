"""Kendall tau-b with ties and top-k Jaccard against hand-computed and brute-force values."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mechflow.errors import ConfigError, DataError
from mechflow.stats.bootstrap import resample_indices
from mechflow.stats.stability import (
    bootstrap_rank_stability,
    kendall_tau_b,
    pairwise_stability,
    summarize,
    top_k_jaccard,
    top_k_set,
)


def brute_tau_b(x, y):
    """Kendall (1945) tau-b by enumerating all pairs."""
    c = d = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        if sx == 0 and sy == 0:
            continue  # tied in both: counts in neither n1 nor n2 correction below
        if sx == 0:
            tx += 1
        elif sy == 0:
            ty += 1
        elif sx == sy:
            c += 1
        else:
            d += 1
    # (n0 - n1) = pairs not tied in x = c + d + ty; (n0 - n2) = c + d + tx
    return (c - d) / np.sqrt((c + d + ty) * (c + d + tx))


def test_tau_b_hand_case_with_ties():
    # pairs: (0,1) (0,2) (0,3) (1,3) concordant; (1,2) tied in x; (2,3) tied in y
    # tau_b = (4 - 0) / sqrt((6 - 1) * (6 - 1)) = 0.8
    assert kendall_tau_b([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(0.8, abs=1e-12)
    # one discordant pair, ties in both: x=[1,1,2,3], y=[2,1,1,3]
    # (0,1) tie x; (0,2) x up y down: D; (0,3) C; (1,2) x up, y tie; (1,3) C; (2,3) C
    # C=3, D=1, n0=6, n1=1, n2=1 -> 2/5
    assert kendall_tau_b([1, 1, 2, 3], [2, 1, 1, 3]) == pytest.approx(0.4, abs=1e-12)


def test_tau_b_matches_brute_force_on_heavily_tied_data():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.integers(0, 4, 15).astype(float)
        y = rng.integers(0, 3, 15).astype(float)
        if np.all(x == x[0]) or np.all(y == y[0]):
            continue
        assert kendall_tau_b(x, y) == pytest.approx(brute_tau_b(x, y), abs=1e-12)


def test_constant_ranking_gives_nan_tau():
    assert np.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))


def test_top_k_by_magnitude_and_tie_break():
    x = np.array([5.0, -4.0, 3.0, 0.0, 1.0])
    y = np.array([1.0, 4.0, -5.0, 3.0, 0.0])
    assert top_k_set(x, 2).tolist() == [0, 1]
    assert top_k_set(y, 2).tolist() == [1, 2]
    assert top_k_set(y, 2, by_abs=False).tolist() == [1, 3]
    assert top_k_jaccard(x, y, 2) == pytest.approx(1 / 3)
    assert top_k_set([1.0, 1.0, 1.0, 0.0], 2).tolist() == [0, 1]  # tie -> lower index


def test_pairwise_matrices_equal_the_pairwise_calls():
    rng = np.random.default_rng(1)
    base = rng.normal(size=30)
    scores = {"eap": base, "eap_ig": base + rng.normal(0, 0.3, 30), "acdc": rng.normal(size=30)}
    res = pairwise_stability(scores, k=5)
    for (i, a), (j, b) in itertools.product(enumerate(scores), repeat=2):
        if i == j:
            continue
        assert res.tau[i, j] == pytest.approx(kendall_tau_b(np.abs(scores[a]), np.abs(scores[b])))
        assert res.jaccard[i, j] == pytest.approx(top_k_jaccard(scores[a], scores[b], 5))
    off = res.tau[np.triu_indices(3, 1)]
    assert res.tau_summary["q0.5"] == pytest.approx(np.median(off))
    assert res.tau[0, 1] > res.tau[0, 2]  # the perturbed copy agrees more than the unrelated method


def test_bootstrap_stability_per_resample_values_are_recomputable():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 12)) + np.linspace(-2, 2, 12)
    idx = resample_indices(40, 30, seed=7)
    res = bootstrap_rank_stability(X, k=4, indices=idx)
    full = np.abs(X.mean(axis=0))
    for b in (0, 17, 29):
        row = np.abs(X[idx[b]].mean(axis=0))
        assert res.tau[b] == pytest.approx(kendall_tau_b(row, full))
        assert res.jaccard[b] == pytest.approx(top_k_jaccard(row, full, 4))
    assert res.selection_frequency.sum() == pytest.approx(4.0)


def test_bootstrap_stability_drops_with_noise():
    rng = np.random.default_rng(3)
    signal = np.linspace(0, 5, 20)
    clean = bootstrap_rank_stability(signal + rng.normal(0, 0.01, (50, 20)), k=5, B=200, seed=0)
    noisy = bootstrap_rank_stability(signal + rng.normal(0, 20, (50, 20)), k=5, B=200, seed=0)
    assert clean.tau_summary["q0.05"] == 1.0 and clean.jaccard_summary["q0.05"] == 1.0
    assert noisy.tau_summary["q0.5"] < 0.9 and noisy.jaccard_summary["q0.5"] < 1.0


def test_summarize_excludes_nans():
    s = summarize(np.array([1.0, np.nan, 3.0]), quantiles=(0.5,))
    assert s == {"n": 2, "n_nan": 1, "mean": 2.0, "q0.5": 2.0}


def test_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"stats\.top_k.*larger than the number of components \(3\)"):
        top_k_jaccard([1, 2, 3], [3, 2, 1], 4)
    with pytest.raises(DataError, match=r"scores\['b'\].*NaN"):
        pairwise_stability({"a": [1.0, 2.0], "b": [np.nan, 1.0]}, k=1)
    with pytest.raises(DataError, match="differ in length"):
        pairwise_stability({"a": [1.0, 2.0], "b": [1.0, 2.0, 3.0]}, k=1)
