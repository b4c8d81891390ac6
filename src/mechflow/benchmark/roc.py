"""ROC curves and ROC AUC of a ranking against reference positives: the one implementation, used by
the benchmark's comparison (`mechflow.benchmark.compare`) and by the reference stage
(`mechflow.reference.auc`, which builds on this package's edge restriction and exhaustive reference).

ROC AUC is the Mann-Whitney U statistic normalised by ``n_pos n_neg`` (Hanley & McNeil 1982): the
probability that a random positive scores above a random negative, ties counting 1/2. With
mid-ranks of all scores, ``AUC = (sum of positive ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)``.

A method that gives circuits rather than scores (ACDC, one circuit per tau) has only a few (FPR, TPR)
points; `step_auc` is the trapezoid area through them.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
from scipy import stats as sps


def roc_auc(scores, labels) -> float | None:
    """Mann-Whitney AUC of ``scores`` for bool ``labels`` (ties 1/2); None without positives or negatives."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"roc_auc: scores {s.shape} and labels {y.shape} must be equal-length vectors")
    if np.isnan(s).any():
        raise ValueError("roc_auc: scores contain NaN")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = sps.rankdata(s, method="average")
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of thresholding ``scores`` at each distinct value, from (0, 0) to (1, 1)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # tied scores enter together
    tp = np.cumsum(y)[last_of_value]
    fp = np.cumsum(~y)[last_of_value]
    n_pos, n_neg = max(1, int(y.sum())), max(1, int((~y).sum()))
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def step_auc(points: list[tuple[float, float]]) -> float:
    """Trapezoid area over (FPR, TPR) points plus (0, 0) and (1, 1), sorted by (FPR, TPR)."""
    pts = sorted({(0.0, 0.0), (1.0, 1.0), *points})
    return float(sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in pairwise(pts)))
