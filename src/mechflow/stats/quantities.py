"""The quantities the statistics stage bootstraps, and the bootstrap table they fill.

Step 2 of `mechflow.stats.stage`: stack every per-prompt quantity into one matrix X [n_prompts, q]
(each method's score of each component, the clean and corrupted task metric, m(N), m(empty), m(C),
m(N minus C) and the metric at every curve budget) and name the statistics; `circuit_functional`
maps resampled column means to the circuit quantities with the circuits stage's own formulas
(MIB, Mueller et al. 2025). Step 4: `check_reference` compares the point estimates with the
numbers in circuit.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import polars as pl

from mechflow.errors import DataError
from mechflow.stats.bootstrap import BootstrapResult
from mechflow.stats.readers import CircuitData, NodeScores, Prompts

# circuit.json and circuit_prompts.parquet hold the same means up to summation order (~1e-16)
REFERENCE_RTOL = 1e-9

CIRCUIT_QUANTITIES = ("m_full", "m_empty", "m_circuit", "faithfulness", "sufficiency", "comprehensiveness", "f1")
CURVE_QUANTITIES = ("cpr", "cmd")


def circuit_functional(budgets: Sequence[float], n_edges: Sequence[int]):
    """Map means [..., 4 + T] (m_full, m_empty, m_circuit, m_without_circuit, curve metrics) to
    [..., 7 (+2)] = `CIRCUIT_QUANTITIES` (+ `CURVE_QUANTITIES` when T > 0).

    Exactly the circuits stage's formulas (`mechflow.circuits.faithfulness`): f = (m_C - m_0) /
    (m_N - m_0); sufficiency = f(C); comprehensiveness = 1 - f(N minus C); F1 = harmonic mean
    of the two clipped to [0, 1] (0 when both are 0); CPR/CMD = `area_metrics` of the curve whose
    points are normalised with the same m_N, m_0 (arrays pass through it elementwise).
    """
    from mechflow.circuits.faithfulness import CurvePoint, area_metrics  # the circuits stage's own area rule

    budgets, n_edges = list(budgets), list(n_edges)

    def fn(means: np.ndarray) -> np.ndarray:
        mn, m0, mc, mw = (means[..., i] for i in range(4))
        denom = mn - m0
        f = (mc - m0) / denom
        comp = 1.0 - (mw - m0) / denom
        s, c = np.clip(f, 0.0, 1.0), np.clip(comp, 0.0, 1.0)
        tot = s + c
        f1 = np.where(tot > 0, 2 * s * c / np.where(tot > 0, tot, 1.0), 0.0)
        out = [mn, m0, mc, f, f, comp, f1]
        if budgets:
            points = [CurvePoint(pct, ne, means[..., 4 + t], (means[..., 4 + t] - m0) / denom)
                      for t, (pct, ne) in enumerate(zip(budgets, n_edges))]
            areas = area_metrics(points)
            out += [np.broadcast_to(np.asarray(areas[k], dtype=np.float64), f.shape) for k in CURVE_QUANTITIES]
        return np.stack(out, axis=-1)

    return fn


@dataclass(frozen=True)
class Quantities:
    """The stacked per-prompt matrix and the statistic names / groups the functional returns."""

    X: np.ndarray
    names: list[str]
    group: list[str]
    method: list[str | None]
    component: list[str | None]
    n_direct: int  # the first n_direct columns of X are reported as plain means
    circuit: CircuitData | None

    def functional(self):
        if self.circuit is None:
            return None
        k = self.n_direct
        cfn = circuit_functional(self.circuit.budgets, self.circuit.n_edges)
        return lambda m: np.concatenate([m[..., :k], cfn(m[..., k:])], axis=-1)


def build_quantities(scores: NodeScores | None, prompts: Prompts | None, circuit: CircuitData | None) -> Quantities:
    """Stack every per-prompt column of one prompt set (step 2) and name the statistics.

    Pass `scores` and `prompts` for the node-score batch (with `circuit` when it is the same
    batch), or only `circuit` for a circuit batch of its own.
    """
    cols, names, group, method, comp = [], [], [], [], []
    if scores is not None and prompts is not None:
        for m in scores.methods:
            cols.append(scores.scores[m])
            names += [f"score:{m}:{c}" for c in scores.components]
            group += ["score"] * len(scores.components)
            method += [m] * len(scores.components)
            comp += list(scores.components)
        cols.append(np.stack([prompts.clean_metric, prompts.corrupted_metric], axis=1))
        names += ["task:clean_metric", "task:corrupted_metric"]
        group += ["task", "task"]
        method += [None, None]
        comp += [None, None]
    n_direct = sum(c.shape[1] for c in cols)
    if circuit is not None:
        cols.append(circuit.metrics)
        qs = list(CIRCUIT_QUANTITIES)
        if circuit.curve is not None:
            cols.append(circuit.curve)
            qs += list(CURVE_QUANTITIES)
        names += [f"circuit:{q}" for q in qs]
        group += ["circuit"] * len(qs)
        method += [None] * len(qs)
        comp += [None] * len(qs)
    return Quantities(np.concatenate(cols, axis=1), names, group, method, comp, n_direct, circuit)


def reference_values(circuit: CircuitData | None) -> dict[str, float]:
    """circuit.json's value of each circuit quantity (empty without circuit.json)."""
    if circuit is None or circuit.reference is None:
        return {}
    ref = circuit.reference
    qs = CIRCUIT_QUANTITIES + (CURVE_QUANTITIES if circuit.curve is not None else ())
    return {f"circuit:{q}": float(getattr(ref, q)) for q in qs}


def check_reference(names: Sequence[str], estimate: np.ndarray, refs: Mapping[str, float], source: Any) -> None:
    """Step 4: the bootstrap's point estimates are circuit.json's numbers (else the files disagree)."""
    for name, est in zip(names, estimate):
        if name in refs and not abs(est - refs[name]) <= REFERENCE_RTOL * max(1.0, abs(refs[name])):
            raise DataError(f"{source}: {name.split(':', 1)[1]}={refs[name]!r} but the per-prompt circuit tables "
                            f"give {float(est)!r}; circuit.json and circuit_prompts/curve_prompts.parquet must come "
                            "from the same circuits run (re-run the circuits stage)")


def bootstrap_table(q: Quantities, res: BootstrapResult, refs: Mapping[str, float], seed: int) -> pl.DataFrame:
    """One row per quantity: estimate, SE, percentile and BCa bounds (null when not computed)."""
    p = len(q.names)

    def bounds(method: str, side: int) -> np.ndarray:
        return res.intervals[method][:, side] if method in res.intervals else np.full(p, np.nan)

    df = pl.DataFrame({
        "quantity": q.names, "group": q.group,
        "method": pl.Series(q.method, dtype=pl.String), "component": pl.Series(q.component, dtype=pl.String),
        "estimate": res.estimate, "se": res.standard_error,
        "percentile_lo": bounds("percentile", 0), "percentile_hi": bounds("percentile", 1),
        "bca_lo": bounds("bca", 0), "bca_hi": bounds("bca", 1),
        "reference": pl.Series([refs.get(n) for n in q.names], dtype=pl.Float64),
        "ci_level": np.full(p, res.ci_level), "n_prompts": np.full(p, res.n, dtype=np.int64),
        "B": np.full(p, res.B, dtype=np.int64), "seed": np.full(p, seed, dtype=np.int64),
    })
    return df.with_columns(pl.col(pl.Float64).fill_nan(None))
