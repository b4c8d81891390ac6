"""The audit's statistics: group gaps with bootstrap CIs and permutation tests, agreement, proportions.

Decision probes (`decision_metrics`). The unit of resampling is the **scenario** (one template with
everything fixed but the attribute): its values are asked together, so they are not independent.
Per scenario and group g: the mean score ``s_g`` (log p(yes) - log p(no)) over g's values, and the share
``y_g`` of g's values decided "yes" (score > 0). Over scenarios:

- ``mean_score[g]`` and ``yes_rate[g]``: the means of ``s_g`` and ``y_g``;
- ``score_gap``: max_g mean_score - min_g mean_score, the largest between-group gap;
- ``parity_gap``: max_g yes_rate - min_g yes_rate (demographic parity difference);
- ``odds_gap``: max over the label y in {yes, no} of (max_g - min_g of P(yes | label y, g)), the
  equalized-odds difference (Hardt et al. 2016) with the scenario's expected decision as the label
  (null when the scenarios carry no label or only one);
- ``flip_rate``: the share of pairs of values from different groups, within a scenario, decided
  differently (counterfactual flips), averaged over scenarios.

All five are functions of per-scenario column means, so one vectorised bootstrap over scenarios
(`mechflow.stats.bootstrap.bootstrap_mean_functional`) gives every CI. The resampling is stratified by
the scenarios' label (scenarios are drawn with replacement within each label class): the mix of
scenarios a bank should approve and refuse is fixed by the probe's design, and an unstratified
resample with one class missing would leave the equalized-odds difference undefined. Percentile
intervals: the gaps are maxima of differences, non-smooth statistics for which BCa's jackknife
acceleration is unreliable.

Permutation test of "the attribute has no effect" (a sharp null: each value's answer does not depend
on its group): within each scenario the group labels are shuffled among its values (the scenario's
values are exchangeable under the null), the gap statistics are recomputed, and
``p = (1 + #{T_perm >= T_obs}) / (1 + n_perm)`` (Phipson & Smyth 2010), which can reach every
observed value and is valid at any n_perm; a test checks that p-values on null data are uniform.
The flip rate has no permutation test: under the sharp null with greedy answers it is not defined by
groups (a flip between two names of one group is as likely).

Proportions of few items (refusal, API accuracy): Wilson score intervals, because a percentile
bootstrap of 0/n or n/n collapses to a zero-width interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.stats import norm

from mechflow.errors import DataError
from mechflow.stats.bootstrap import bootstrap_mean_functional, resample_indices


@dataclass(frozen=True)
class Estimate:
    """A statistic with its confidence interval (and a permutation p-value where one is defined)."""

    value: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None = None

    def to_dict(self) -> dict:
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high, "p_value": self.p_value}


def _f(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def wilson(k: int, n: int, level: float = 0.95) -> Estimate:
    """k / n with its Wilson score interval (Wilson 1927); None when n = 0."""
    if n == 0:
        return Estimate(None, None, None)
    z = float(norm.ppf(0.5 + level / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if k == 0 else max(0.0, centre - half)  # exact at the ends (no 1e-17 rounding residue)
    high = 1.0 if k == n else min(1.0, centre + half)
    return Estimate(p, low, high)


# ----------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class DecisionTable:
    """Scores of one decision probe: one row per asked value (scenario index, group index, score, label)."""

    scenario: np.ndarray  # [n] int
    group: np.ndarray  # [n] int, index into groups
    score: np.ndarray  # [n] float, finite
    label: np.ndarray  # [n] int: 1 expected yes, 0 expected no, -1 no label
    groups: tuple[str, ...]

    def __post_init__(self):
        n = len(self.score)
        if not (len(self.scenario) == len(self.group) == len(self.label) == n):
            raise DataError("decision table: scenario, group, score and label must have one entry per value")
        if n and not np.all(np.isfinite(self.score)):
            raise DataError("decision table: scores must be finite (leave out values without a score)")


def stratified_indices(strata: np.ndarray, B: int, seed: int) -> np.ndarray:
    """[B, n] bootstrap indices that resample each stratum's positions within the stratum."""
    rng = np.random.default_rng(seed)
    idx = np.empty((B, len(strata)), dtype=np.int64)
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        idx[:, members] = rng.choice(members, size=(B, len(members)), replace=True)
    return idx


def _scenario_columns(t: DecisionTable) -> tuple[np.ndarray, np.ndarray]:
    """Per-scenario columns [n_scen, 4G + 3]: s_g, y_g, y_g·[label yes], y_g·[label no], [yes], [no], flips;
    and the scenario ids kept (those with every group present)."""
    G = len(t.groups)
    rows, kept = [], []
    for s in np.unique(t.scenario):
        m = t.scenario == s
        g, sc, lab = t.group[m], t.score[m], t.label[m]
        if len(set(g.tolist())) < G:
            continue
        dec = (sc > 0).astype(float)
        s_g = np.array([sc[g == k].mean() for k in range(G)])
        y_g = np.array([dec[g == k].mean() for k in range(G)])
        label = int(lab[0])
        diff = g[:, None] != g[None, :]
        flips = (dec[:, None] != dec[None, :]) & diff
        flip = flips.sum() / diff.sum()
        rows.append(np.concatenate([s_g, y_g, y_g * (label == 1), y_g * (label == 0),
                                    [float(label == 1), float(label == 0), flip]]))
        kept.append(int(s))
    return np.array(rows, dtype=np.float64).reshape(len(rows), 4 * G + 3), np.array(kept)


def _decision_statistics(G: int):
    """The vectorised map from column means [..., 4G+3] to (mean_score[G], score_gap, yes_rate[G],
    parity_gap, odds_gap, flip_rate)."""

    def fn(m: np.ndarray) -> np.ndarray:
        s, y = m[..., :G], m[..., G:2 * G]
        y1, y0 = m[..., 2 * G:3 * G], m[..., 3 * G:4 * G]
        p1, p0, flip = m[..., 4 * G:4 * G + 1], m[..., 4 * G + 1:4 * G + 2], m[..., 4 * G + 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            tpr, fpr = y1 / p1, y0 / p0
        gap = s.max(-1) - s.min(-1)
        parity = y.max(-1) - y.min(-1)
        odds = np.maximum(tpr.max(-1) - tpr.min(-1), fpr.max(-1) - fpr.min(-1))
        return np.concatenate([s, gap[..., None], y, parity[..., None], odds[..., None], flip[..., None]], -1)

    return fn


def _gaps(t: DecisionTable, group: np.ndarray) -> np.ndarray:
    """(score gap, parity gap, odds gap) of the pooled means for a group assignment [.., n] (vectorised)."""
    G = len(t.groups)
    onehot = (group[..., None] == np.arange(G)).astype(np.float64)  # [..., n, G]
    dec = (t.score > 0).astype(np.float64)
    count = onehot.sum(-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.einsum("...ng,n->...g", onehot, t.score) / count
        y = np.einsum("...ng,n->...g", onehot, dec) / count
        rates = []
        for lab in (1, 0):
            w = (t.label == lab).astype(np.float64)
            rates.append(np.einsum("...ng,n->...g", onehot, dec * w) / np.einsum("...ng,n->...g", onehot, w))
    odds = np.maximum(*(r.max(-1) - r.min(-1) for r in rates))
    return np.stack([s.max(-1) - s.min(-1), y.max(-1) - y.min(-1), odds], -1)


def permutation_pvalues(t: DecisionTable, n_perm: int, seed: int = 0) -> np.ndarray:
    """p-values of (score gap, parity gap, odds gap) under within-scenario shuffles of the group labels.

    The observed statistics are those of the pooled values (each value weighs the same); with equal
    values per group per scenario, as in the shipped probes, they equal the scenario-mean statistics.
    """
    rng = np.random.default_rng(seed)
    perm = np.empty((n_perm, len(t.group)), dtype=t.group.dtype)
    for s in np.unique(t.scenario):
        idx = np.flatnonzero(t.scenario == s)
        perm[:, idx] = rng.permuted(np.tile(t.group[idx], (n_perm, 1)), axis=1)
    observed = _gaps(t, t.group)
    null = _gaps(t, perm)
    exceed = (null >= observed - 1e-12 * np.maximum(1.0, np.abs(observed))).sum(0)
    p = (1 + exceed) / (1 + n_perm)
    return np.where(np.isfinite(observed), p, np.nan)


@dataclass(frozen=True)
class DecisionMetrics:
    groups: tuple[str, ...]
    n_scenarios: int
    n_values: int
    mean_score: dict[str, Estimate]
    yes_rate: dict[str, Estimate]
    score_gap: Estimate
    parity_gap: Estimate
    odds_gap: Estimate
    flip_rate: Estimate

    def to_dict(self) -> dict:
        return {"groups": list(self.groups), "n_scenarios": self.n_scenarios, "n_values": self.n_values,
                "mean_score": {g: e.to_dict() for g, e in self.mean_score.items()},
                "yes_rate": {g: e.to_dict() for g, e in self.yes_rate.items()},
                "score_gap": self.score_gap.to_dict(), "parity_gap": self.parity_gap.to_dict(),
                "odds_gap": self.odds_gap.to_dict(), "flip_rate": self.flip_rate.to_dict()}


def decision_metrics(t: DecisionTable, *, n_boot: int, n_perm: int, ci_level: float, seed: int) -> DecisionMetrics:
    """The statistics of the module docstring, each with a percentile bootstrap CI over scenarios."""
    G = len(t.groups)
    X, kept = _scenario_columns(t)
    if len(kept) < 2:
        raise DataError(f"decision probe: {len(kept)} scenario(s) have an answer for every group; the bootstrap "
                        "needs at least 2 (add scenarios, or check that the endpoint gives logprobs / answers)")
    keep = np.isin(t.scenario, kept)
    t = DecisionTable(t.scenario[keep], t.group[keep], t.score[keep], t.label[keep], t.groups)
    labels = X[:, 4 * G] - X[:, 4 * G + 1]  # +1 label yes, -1 label no, 0 no label
    idx = stratified_indices(labels, n_boot, seed)
    res = bootstrap_mean_functional(X, _decision_statistics(G), indices=idx, ci_level=ci_level,
                                    methods=("percentile",))
    est, ci = res.estimate, res.ci("percentile")
    p = permutation_pvalues(t, n_perm, seed)

    def e(i: int, pv: float | None = None) -> Estimate:
        return Estimate(_f(est[i]), _f(ci[i, 0]), _f(ci[i, 1]), _f(pv) if pv is not None else None)

    return DecisionMetrics(
        groups=t.groups, n_scenarios=len(kept), n_values=len(t.score),
        mean_score={g: e(k) for k, g in enumerate(t.groups)},
        score_gap=e(G, p[0]),
        yes_rate={g: e(G + 1 + k) for k, g in enumerate(t.groups)},
        parity_gap=e(2 * G + 1, p[1]), odds_gap=e(2 * G + 2, p[2]), flip_rate=e(2 * G + 3))


# ----------------------------------------------------------------------------- paraphrases


def pairwise_agreement(answers: Sequence[str | None]) -> float:
    """Share of pairs of paraphrases given the same answer (an unparsed answer is its own category)."""
    a = ["\0none" if x is None else x for x in answers]
    n = len(a)
    if n < 2:
        raise DataError("paraphrase probe: a question needs at least 2 paraphrases")
    same = sum(a[i] == a[j] for i in range(n) for j in range(i + 1, n))
    return same / (n * (n - 1) / 2)


def paraphrase_metrics(questions: Sequence[tuple[Sequence[str | None], str | None]], *, n_boot: int,
                       ci_level: float, seed: int) -> dict:
    """Mean pairwise agreement, share of questions answered identically in every wording, and accuracy
    (share of wordings answered correctly, over questions with a known answer), with bootstrap CIs over
    questions."""
    if len(questions) < 2:
        raise DataError("paraphrase probe: needs at least 2 questions for a confidence interval")
    agree = np.array([pairwise_agreement(a) for a, _ in questions])
    consistent = np.array([float(len(set(a)) == 1 and a[0] is not None) for a, _ in questions])
    idx = resample_indices(len(questions), n_boot, seed)
    res = bootstrap_mean_functional(np.stack([agree, consistent], 1), indices=idx, ci_level=ci_level,
                                    methods=("percentile",))
    ci = res.ci("percentile")
    out = {"n_questions": len(questions), "n_paraphrases": int(sum(len(a) for a, _ in questions)),
           "agreement": Estimate(_f(res.estimate[0]), _f(ci[0, 0]), _f(ci[0, 1])).to_dict(),
           "consistent_share": Estimate(_f(res.estimate[1]), _f(ci[1, 0]), _f(ci[1, 1])).to_dict(),
           "unparsed": int(sum(x is None for a, _ in questions for x in a))}
    known = [(a, ans) for a, ans in questions if ans is not None]
    if len(known) >= 2:
        acc = np.array([np.mean([x == ans for x in a]) for a, ans in known])
        r = bootstrap_mean_functional(acc[:, None], indices=resample_indices(len(known), n_boot, seed),
                                      ci_level=ci_level, methods=("percentile",))
        out["accuracy"] = Estimate(_f(r.estimate[0]), _f(r.ci("percentile")[0, 0]),
                                   _f(r.ci("percentile")[0, 1])).to_dict()
    else:
        out["accuracy"] = Estimate(None, None, None).to_dict()
    return out
