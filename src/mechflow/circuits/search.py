"""Minimal faithful circuit: the shortest prefix of the ranked edge (or node) list with f >= target.

Steps:

1. Rank edges by |EAP-IG score| (or EAP, or signed; `circuits.method`, `circuits.absolute`).
2. Bracket: f(empty prefix) = 0 < target and f(all edges) = 1 >= target hold exactly. The MIB
   budget grid (0.1% ... 100%) is evaluated first (it is reported anyway); the smallest grid
   prefix with f >= target becomes ``hi`` and the grid point before it ``lo``.
3. Bisection on [lo, hi] keeping the invariant f(lo) < target <= f(hi), all f exact.

Non-monotone f: adding an edge can lower f (e.g. an edge that cancels another's effect), so the
result is guaranteed to be a *boundary*: f(k) >= target and f(k-1) < target, and no smaller grid
budget passes. A smaller passing prefix can exist between grid points; we report the number of
exact evaluations and both f(k) and f(k-1) so the boundary is checkable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import Tensor

from mechflow.circuits.config import check_target
from mechflow.circuits.faithfulness import (
    MIB_PERCENTAGES,
    CircuitEvaluator,
    CurvePoint,
    faithfulness_curve,
    n_units,
    unit_prefix,
)

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """``n_edges``: units in the circuit (edges, or nodes for a node evaluator)."""

    n_edges: int
    faithfulness: float
    metric: float
    faithfulness_one_fewer: float
    curve: list[CurvePoint] = field(default_factory=list)
    n_evaluations: int = 0


def minimal_faithful_prefix(evaluator: CircuitEvaluator, order: Tensor, target: float = 0.8,
                            percentages: tuple[float, ...] = MIB_PERCENTAGES) -> SearchResult:
    """Smallest ``k`` found by bracketed bisection with f(top-k) >= target (see module doc).

    Works for any evaluator with the `CircuitEvaluator` interface: edges, or nodes
    (`mechflow.circuits.nodes.NodeEvaluator`, ``n_edges`` then counts nodes).
    """
    check_target(target)  # the config's own check (`circuits.target`), for callers passing a raw float
    total = n_units(evaluator)
    start = evaluator.n_evaluations
    curve = faithfulness_curve(evaluator, order, percentages)
    cache: dict[int, tuple[float, float]] = {0: (evaluator.m_empty, 0.0)}
    for p in curve:
        cache[p.n_units] = (p.metric, p.faithfulness)

    def f(k: int) -> float:
        if k not in cache:
            m = evaluator.metric(unit_prefix(evaluator, order, k))
            cache[k] = (m, (m - evaluator.m_empty) / (evaluator.m_full - evaluator.m_empty))
        return cache[k][1]

    lo, hi = 0, total
    if f(hi) < target:  # cannot happen in exact arithmetic (f(N) = 1); guard float round-off
        raise ValueError(f"the full edge set reaches f = {f(hi):.6f} < target {target}")
    for p in curve:
        if p.faithfulness >= target:
            hi = p.n_units
            break
        lo = max(lo, p.n_units)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if f(mid) >= target:
            hi = mid
        else:
            lo = mid
    log.info("minimal faithful circuit: %d units, f=%.4f (target %.2f)", hi, f(hi), target)
    return SearchResult(n_edges=hi, faithfulness=f(hi), metric=cache[hi][0],
                        faithfulness_one_fewer=f(hi - 1) if hi > 0 else float("nan"), curve=curve,
                        n_evaluations=evaluator.n_evaluations - start)
