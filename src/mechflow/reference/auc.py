"""ROC AUC, ROC curves, correlations and the positives definition of the reference stage.

ROC AUC is the Mann-Whitney U statistic normalised by ``n_pos n_neg`` (Hanley & McNeil 1982): the
probability that a random positive scores above a random negative, ties counting 1/2. With
mid-ranks of all scores, ``AUC = (sum of positive ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)``.

Positives (the reference "circuit"; MIB and ACDC fix no single rule, so both of these are reported):

* ``top_k``: the k = ceil(top_fraction x n) items of largest |exact effect| (stable order on ties);
* ``threshold``: items with |exact effect| > threshold x |m(N) - m(empty)|.

Methods are ranked by |score| (as MIB ranks edges): a component matters whatever its sign.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

VARIANTS = ("top_k", "threshold")


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


def positives(exact, top_fraction: float, threshold: float, scale: float) -> dict[str, dict]:
    """Both positives variants for exact effects ``exact`` (see module docstring)."""
    e = np.abs(np.asarray(exact, dtype=np.float64))
    n = e.size
    k = min(n, math.ceil(top_fraction * n))
    top = np.zeros(n, dtype=bool)
    top[np.argsort(-e, kind="stable")[:k]] = True
    cutoff = threshold * abs(scale)
    return {
        "top_k": {"labels": top, "k": k, "n_positives": k, "rule": f"top {k} of {n} by |exact| "
                  f"(k = ceil({top_fraction} x {n}))"},
        "threshold": {"labels": e > cutoff, "cutoff": cutoff, "n_positives": int((e > cutoff).sum()),
                      "rule": f"|exact| > {threshold} x |m(N) - m(empty)| = {cutoff:.6g}"},
    }


def agreement(method, exact) -> dict:
    """Pearson and Spearman of signed scores vs signed exact effects, and Spearman of |.|."""
    m, e = np.asarray(method, dtype=np.float64), np.asarray(exact, dtype=np.float64)
    if m.size < 2 or np.ptp(m) == 0 or np.ptp(e) == 0:
        return {"pearson": None, "spearman": None, "spearman_abs": None}
    return {"pearson": float(sps.pearsonr(m, e).statistic), "spearman": float(sps.spearmanr(m, e).statistic),
            "spearman_abs": float(sps.spearmanr(np.abs(m), np.abs(e)).statistic)}


def method_report(method, exact, pos: dict[str, dict]) -> dict:
    """ROC AUC of |method| under every positives variant, plus `agreement`."""
    score = np.abs(np.asarray(method, dtype=np.float64))
    return {"roc_auc": {v: roc_auc(score, pos[v]["labels"]) for v in VARIANTS}, **agreement(method, exact)}
