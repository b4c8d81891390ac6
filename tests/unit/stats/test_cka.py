"""Linear CKA: HSIC reference, invariances, and the by-depth matrix."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ortho_group

from mechflow.errors import DataError
from mechflow.stats.cka import cka_by_depth, hsic_cka, linear_cka


@pytest.fixture(scope="module")
def reps():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 12))
    Y = X @ rng.normal(size=(12, 7)) + 0.5 * rng.normal(size=(80, 7)) + 3.0  # offset: centring matters
    return X, Y


def test_matches_hsic_formula(reps):
    X, Y = reps
    assert linear_cka(X, Y) == pytest.approx(hsic_cka(X, Y), rel=1e-10)
    Z = np.random.default_rng(1).normal(size=(80, 20))
    assert linear_cka(X, Z) == pytest.approx(hsic_cka(X, Z), rel=1e-10)


def test_identity_orthogonal_and_scale_invariance(reps):
    X, Y = reps
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    Q = ortho_group.rvs(12, random_state=2)
    assert linear_cka(X @ Q * 7.5, Y) == pytest.approx(linear_cka(X, Y), rel=1e-10)
    assert linear_cka(X @ Q, X) == pytest.approx(1.0, abs=1e-12)
    # not invariant to a non-orthogonal invertible map (so the invariance test can fail)
    A = np.diag(np.linspace(0.1, 10, 12))
    assert abs(linear_cka(X @ A, X) - 1.0) > 0.05
    v = linear_cka(X, Y)
    assert 0.0 < v < 1.0
    assert linear_cka(Y, X) == pytest.approx(v, rel=1e-12)


def test_by_depth_matrix_entries_and_depths():
    rng = np.random.default_rng(3)
    acts_a = [rng.normal(size=(50, 8)) for _ in range(3)]
    acts_b = {0: acts_a[2] @ ortho_group.rvs(8, random_state=4), 1: rng.normal(size=(50, 5))}
    res = cka_by_depth(acts_a, acts_b, n_layers_b=4)
    assert res.matrix.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            assert res.matrix[i, j] == pytest.approx(linear_cka(acts_a[i], acts_b[j]), rel=1e-12)
    assert res.matrix[2, 0] == pytest.approx(1.0)
    np.testing.assert_allclose(res.depth_a, [0.5 / 3, 1.5 / 3, 2.5 / 3])
    np.testing.assert_allclose(res.depth_b, [0.125, 0.375])
    assert res.best_match_b[2] == 0


def test_errors():
    X = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(DataError, match="same tokens"):
        linear_cka(X, X[:9])
    with pytest.raises(DataError, match="constant"):
        linear_cka(X, np.ones((10, 2)))
    X[4, 1] = np.inf
    with pytest.raises(DataError, match=r"NaN/inf.*\(4, 1\)"):
        linear_cka(X, X)


def test_debiased_matches_song_gram_formula_and_is_one_on_identity(reps):
    from mechflow.stats.cka import debiased_linear_cka, unbiased_hsic_cka

    X, Y = reps
    assert debiased_linear_cka(X, Y) == pytest.approx(unbiased_hsic_cka(X, Y), rel=1e-9)
    assert debiased_linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    Q = ortho_group.rvs(12, random_state=2)
    assert debiased_linear_cka(X @ Q * 3.0, Y) == pytest.approx(debiased_linear_cka(X, Y), rel=1e-9)


def test_debiased_removes_the_few_rows_bias_of_independent_representations():
    """n = 40 rows, 300 dims: plug-in CKA of independent Gaussians is large, the debiased one ~ 0."""
    from mechflow.stats.cka import debiased_linear_cka, shuffled_baseline

    rng = np.random.default_rng(5)
    biased, debiased = [], []
    for _ in range(20):
        X, Y = rng.normal(size=(40, 300)), rng.normal(size=(40, 300))
        biased.append(linear_cka(X, Y))
        debiased.append(debiased_linear_cka(X, Y))
    assert np.mean(biased) > 0.5
    assert abs(np.mean(debiased)) < 0.02
    X = rng.normal(size=(40, 300))
    base = shuffled_baseline(X, X @ ortho_group.rvs(300, random_state=6), n_shuffles=10)
    assert base["linear"] > 0.5 and abs(base["debiased"]) < 0.05


def test_by_depth_carries_debiased_matrix():
    rng = np.random.default_rng(7)
    acts_a = [rng.normal(size=(30, 6)) for _ in range(2)]
    acts_b = [rng.normal(size=(30, 5)) for _ in range(3)]
    from mechflow.stats.cka import debiased_linear_cka

    res = cka_by_depth(acts_a, acts_b)
    assert res.debiased.shape == (2, 3)
    assert res.debiased[1, 2] == pytest.approx(debiased_linear_cka(acts_a[1], acts_b[2]), rel=1e-12)
