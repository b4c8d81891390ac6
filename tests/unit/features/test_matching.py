"""Cross-model feature matching on synthetic profiles with planted matches."""

from __future__ import annotations

import numpy as np
import pytest

from mechflow.errors import ConfigError, DataError
from mechflow.features.matching import correlation_matrix, match_features, shared_vocabulary


def planted(seed=0, n=400, f_a=12, f_extra=8, noise=0.5):
    """B holds A's features (shuffled, rescaled, noisy) plus unrelated ones; returns truth map."""
    rng = np.random.default_rng(seed)
    A = rng.exponential(size=(n, f_a)) * (rng.random((n, f_a)) < 0.3)  # sparse, SAE-like
    perm = rng.permutation(f_a + f_extra)
    B = np.empty((n, f_a + f_extra))
    B[:, perm[:f_a]] = 2.0 * A + noise * rng.exponential(size=(n, f_a))
    B[:, perm[f_a:]] = rng.exponential(size=(n, f_extra)) * (rng.random((n, f_extra)) < 0.3)
    return A, B, perm[:f_a]


def test_correlation_matrix_matches_numpy_corrcoef():
    A, B, _ = planted()
    C, dead_a, dead_b = correlation_matrix(A, B)
    ref = np.corrcoef(A.T, B.T)[: A.shape[1], A.shape[1]:]
    np.testing.assert_allclose(C, ref, atol=1e-12)
    assert not dead_a.any() and not dead_b.any()


@pytest.mark.parametrize("null", ["shuffle", "circular_shift"])
def test_planted_matches_are_recovered_and_significant(null):
    A, B, truth = planted()
    res = match_features(A, B, n_permutations=50, null=null, seed=1)
    assert res.best_b.tolist() == truth.tolist()
    assert sorted((i, j) for i, j, _ in res.pairs) == [(i, int(truth[i])) for i in range(len(truth))]
    assert np.all(res.best_corr > res.threshold(0.99))
    assert np.all(res.p_value == pytest.approx(1 / 51))


def test_unrelated_features_are_not_significant():
    rng = np.random.default_rng(2)
    A = rng.normal(size=(300, 10))
    B = rng.normal(size=(300, 15))
    res = match_features(A, B, n_permutations=99, seed=3)
    # the null of max correlations is the right reference: observed maxima look like null draws
    assert (res.p_value <= 0.01).sum() <= 1
    assert res.null_max.shape == (99, 10)
    assert np.median(res.best_corr) > 0.05  # max over 15 features is biased up; the null accounts for it


def test_dead_features_get_zero_correlation():
    A, B, _ = planted()
    B[:, 3] = 0.0
    C, _, dead_b = correlation_matrix(A, B)
    assert dead_b[3] and np.all(C[:, 3] == 0.0)


def test_shared_vocabulary_normalizes_word_markers():
    ids_a, ids_b, strings = shared_vocabulary(["<s>", "\u0120the", "cat", "\u0120the"], ["\u2581the", "dog", "cat"])
    assert strings == [" the", "cat"]
    assert ids_a.tolist() == [1, 2] and ids_b.tolist() == [0, 2]


def test_errors():
    with pytest.raises(DataError, match="share the first axis"):
        match_features(np.ones((5, 2)), np.ones((6, 2)))
    with pytest.raises(ConfigError, match=r"feature_matching\.null_kind"):
        match_features(np.eye(4), np.eye(4), null="bogus")
    with pytest.raises(ConfigError, match=r"feature_matching\.n_permutations"):
        match_features(np.eye(4), np.eye(4), n_permutations=0)
