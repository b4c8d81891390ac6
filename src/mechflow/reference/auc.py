"""ROC AUC per positives variant, correlations and the positives definition of the reference stage.

ROC AUC and ROC curves are `mechflow.benchmark.roc`'s (Mann-Whitney with ties): one implementation
for this stage and the benchmark's comparison (this package builds on `mechflow.benchmark`'s edge
restriction and exhaustive reference, so the shared code lives there).

Positives (the reference "circuit"; MIB and ACDC fix no single rule, so both of these are reported):

* ``top_k``: the k = ceil(top_fraction x n) items of largest |exact effect| (stable order on ties);
* ``threshold``: items with |exact effect| > threshold x |m(N) - m(empty)|.

Methods are ranked by |score| (as MIB ranks edges): a component matters whatever its sign.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from mechflow.benchmark.roc import roc_auc

VARIANTS = ("top_k", "threshold")


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
