"""ROC AUC (Mann-Whitney with ties) against a brute-force pairwise count, and the positives rules."""

from __future__ import annotations

import numpy as np
import pytest

from mechflow.benchmark.roc import roc_auc, roc_curve
from mechflow.reference.auc import agreement, positives


def brute_force_auc(scores, labels) -> float:
    """P(score of a positive > score of a negative), ties 1/2, by counting every pair."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_auc_equals_brute_force_pair_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    scores = rng.integers(0, 6, n).astype(float)  # few distinct values: many ties
    labels = rng.random(n) < 0.3
    labels[0], labels[1] = True, False
    assert roc_auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)


def test_auc_known_values_and_degenerate_cases():
    assert roc_auc([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0
    assert roc_auc([0, 1, 2, 3], [1, 1, 0, 0]) == 0.0
    assert roc_auc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.5  # all tied
    assert roc_auc([0.5, 0.2, 0.9], [1, 0, 0]) == 0.5
    assert roc_auc([1, 2], [0, 0]) is None and roc_auc([1, 2], [1, 1]) is None
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([np.nan, 1.0], [1, 0])


@pytest.mark.parametrize("seed", range(3))
def test_trapezoid_area_of_the_roc_curve_is_the_auc(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, 40).astype(float)
    labels = rng.random(40) < 0.4
    fpr, tpr = roc_curve(scores, labels)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(roc_auc(scores, labels), abs=1e-12)


def test_positives_top_k_and_threshold():
    exact = np.array([0.5, -2.0, 0.01, 1.0, -0.3, 0.0, 0.2, 0.05, -0.02, 0.7])
    pos = positives(exact, top_fraction=0.25, threshold=0.1, scale=-3.0)  # |scale| is used
    assert pos["top_k"]["k"] == 3  # ceil(0.25 x 10)
    assert set(np.flatnonzero(pos["top_k"]["labels"])) == {1, 3, 9}  # largest |exact|
    assert pos["threshold"]["cutoff"] == pytest.approx(0.3)
    assert set(np.flatnonzero(pos["threshold"]["labels"])) == {0, 1, 3, 9}  # |e| > 0.3 strictly


def test_agreement_signs_and_constant_input():
    e = np.array([1.0, 2.0, 3.0, -4.0])
    out = agreement(-e, e)
    assert out["pearson"] == pytest.approx(-1) and out["spearman"] == pytest.approx(-1)
    assert out["spearman_abs"] == pytest.approx(1)
    assert agreement(np.zeros(4), e) == {"pearson": None, "spearman": None, "spearman_abs": None}
