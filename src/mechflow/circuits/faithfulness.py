"""Exact circuit evaluation: faithfulness, sufficiency, comprehensiveness, CPR and CMD.

Definitions (MIB, Mueller et al. 2025; Wang et al. 2022; Conmy et al. 2023):

1. m(C): batch-mean task metric when every edge OUTSIDE the circuit C is patched with the
   corrupted sender output and everything downstream is recomputed (`graph_forward`); m(N) keeps
   every edge (the clean run), m(empty) patches every edge (the corrupted run).
2. Normalised faithfulness f(C) = (m(C) - m(empty)) / (m(N) - m(empty)).
3. Sufficiency = f(C). Comprehensiveness = 1 - f(N \\ C): patch ONLY the circuit's edges and
   measure how much of the behaviour is lost. Their F1 is the harmonic mean 2 s c / (s + c) of
   the values clipped to [0, 1] (f can leave [0, 1]; a harmonic mean of negative numbers is
   meaningless), 0 when both clipped values are 0.
4. Faithfulness curve at edge budgets {0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100}% of edges:
   the top ``int(fraction * n_edges)`` edges by score (MIB ``evaluate_area_under_curve``, which
   truncates with ``int``). CPR = trapezoid area under f(x) and CMD = trapezoid area under
   |1 - f(x)|, x = fraction of edges (0.001 ... 1; no point at 0), exactly as MIB computes
   ``area_under`` / ``area_from_1``. Unlike MIB we do not prune edges that are disconnected from
   the input or logits before evaluating (a dangling edge is evaluated as the patch it is).

All numbers are exact forward passes, never Taylor approximations.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from mechflow.attribution.patching import PairBatch, check_batch
from mechflow.circuits.forward import graph_forward
from mechflow.circuits.graph import EdgeGraph

log = logging.getLogger(__name__)

MIB_PERCENTAGES: tuple[float, ...] = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)


class CircuitEvaluator:
    """Caches the corrupted sender outputs once, then evaluates any edge set exactly.

    All prompts go through one forward (the batch metric is defined on the whole batch); split
    large prompt sets into several batches upstream.

    Args:
        model: HookedTransformer; batch: clean/corrupted pair batch.
        last_position_only: unembed only the last position; None (default) checks on the
            corrupted run's logits that the metric reads nothing else (`reads_last_position_only`).
    """

    def __init__(self, model, batch: PairBatch, graph: EdgeGraph | None = None,
                 last_position_only: bool | None = None):
        check_batch(batch)
        self.model, self.batch = model, batch
        self.graph = graph or EdgeGraph.from_cfg(model.cfg)
        self.n_evaluations = 0
        with torch.no_grad():
            logits, self._corrupted = graph_forward(model, batch.corrupted_tokens, self.graph, record=True)
        if last_position_only is None:
            last_position_only = reads_last_position_only(batch.metric, logits)
        # every task metric reads the last position: unembed only it (the vocabulary product is
        # the largest of the forward pass)
        self.logit_positions = slice(-1, None) if last_position_only else None
        self.m_full = self.metric(self.graph.valid)
        self.m_empty = self.metric(torch.zeros_like(self.graph.valid))

    @torch.no_grad()
    def metric_per_prompt(self, kept: Tensor) -> Tensor:
        """Per-prompt metric ``[n]`` of the circuit ``kept`` (bool ``[n_senders, n_receivers]``)."""
        removed = self.graph.valid & ~kept.bool()
        self.n_evaluations += 1
        logits, _ = graph_forward(self.model, self.batch.clean_tokens, self.graph,
                                  corrupted=self._corrupted, removed=removed, logit_positions=self.logit_positions)
        return self.batch.metric(logits)

    def metric(self, kept: Tensor) -> float:
        return float(self.metric_per_prompt(kept).double().mean())

    def faithfulness(self, kept: Tensor) -> float:
        return normalized_faithfulness(self.metric(kept), self.m_full, self.m_empty)

    @property
    def n_units(self) -> int:
        return self.graph.n_edges

    @property
    def universe(self) -> Tensor:
        """Every edge: bool ``[n_senders, n_receivers]``."""
        return self.graph.valid

    def prefix(self, order: Tensor, k: int) -> Tensor:
        return prefix_mask(order, k, self.graph)


def n_units(evaluator) -> int:
    """Units (edges, or nodes) an evaluator's circuits are made of; duck-typed evaluators that only
    expose ``graph`` (e.g. `mechflow.benchmark.evaluation.RestrictedEvaluator`) count ``graph.n_edges``."""
    n = getattr(evaluator, "n_units", None)
    return int(n) if n is not None else int(evaluator.graph.n_edges)


def unit_prefix(evaluator, order: Tensor, k: int) -> Tensor:
    """The circuit made of the first ``k`` ranked units (edges by default)."""
    if hasattr(evaluator, "prefix"):
        return evaluator.prefix(order, k)
    return prefix_mask(order, k, evaluator.graph)


@torch.no_grad()
def reads_last_position_only(metric, logits: Tensor, seed: int = 0) -> bool:
    """Whether ``metric`` depends on the logits of the last position only (checked, not assumed).

    True when the metric gives bitwise the same values on ``logits[:, -1:]`` and on ``logits``
    whose other positions are replaced by large random values.
    """
    if logits.shape[1] == 1:
        return True
    ref = metric(logits)
    noisy = logits.clone()
    gen = torch.Generator().manual_seed(seed)
    noisy[:, :-1] = 100 * torch.randn(noisy[:, :-1].shape, generator=gen, dtype=noisy.dtype)
    try:
        last = metric(logits[:, -1:].contiguous())
    except (IndexError, RuntimeError, ValueError):
        return False
    return bool(torch.equal(ref, last) and torch.equal(ref, metric(noisy)))


def normalized_faithfulness(m_c: float, m_full: float, m_empty: float) -> float:
    """f = (m(C) - m(empty)) / (m(N) - m(empty)); raises when the task has no effect to explain."""
    denom = m_full - m_empty
    if denom == 0:
        raise ValueError("m(N) == m(empty): clean and corrupted prompts give the same metric; "
                         "faithfulness is undefined for this batch")
    return (m_c - m_empty) / denom


def ranked_edges(scores: Tensor, graph: EdgeGraph, absolute: bool = True) -> Tensor:
    """Flat indices (into ``[n_senders * n_receivers]``) of all edges, best first (stable on ties)."""
    flat_valid = graph.valid.flatten().nonzero().flatten()
    vals = scores.flatten()[flat_valid].double()
    if absolute:
        vals = vals.abs()
    order = torch.sort(-vals, stable=True).indices
    return flat_valid[order]


def prefix_mask(order: Tensor, k: int, graph: EdgeGraph) -> Tensor:
    """Bool ``[n_senders, n_receivers]`` mask of the first ``k`` ranked edges."""
    mask = torch.zeros(graph.n_senders * graph.n_receivers, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(graph.n_senders, graph.n_receivers)


@dataclass
class CurvePoint:
    """One budget: the top ``n_edges = int(percent / 100 * total)`` units (edges, or nodes for a
    node evaluator; the field keeps its edge name for the callers that serialise it)."""

    percent: float
    n_edges: int
    metric: float
    faithfulness: float

    @property
    def n_units(self) -> int:
        """Alias of ``n_edges``: the count of whatever unit the circuit is made of."""
        return self.n_edges


def faithfulness_curve(evaluator: CircuitEvaluator, order: Tensor,
                       percentages: tuple[float, ...] = MIB_PERCENTAGES) -> list[CurvePoint]:
    """Exact f of the top-``int(p/100 * n_units)`` units (edges or nodes) for each budget ``p`` (percent)."""
    total = n_units(evaluator)
    points = []
    for pct in percentages:
        k = int(pct / 100 * total)
        m = evaluator.metric(unit_prefix(evaluator, order, k))
        points.append(CurvePoint(pct, k, m, normalized_faithfulness(m, evaluator.m_full, evaluator.m_empty)))
    return points


def area_metrics(points: list[CurvePoint]) -> dict[str, float]:
    """CPR (area under f) and CMD (area under |1 - f|), trapezoid over x = fraction of edges."""
    cpr = cmd = 0.0
    for a, b in itertools.pairwise(points):
        dx = (b.percent - a.percent) / 100
        cpr += dx * (a.faithfulness + b.faithfulness) / 2
        cmd += dx * (abs(1 - a.faithfulness) + abs(1 - b.faithfulness)) / 2
    return {"cpr": cpr, "cmd": cmd}


def sufficiency_comprehensiveness(evaluator: CircuitEvaluator, kept: Tensor) -> dict[str, float]:
    """Exact sufficiency f(C), comprehensiveness 1 - f(N \\ C) and their harmonic mean (F1)."""
    valid = evaluator.universe if hasattr(evaluator, "universe") else evaluator.graph.valid
    suff = evaluator.faithfulness(kept & valid)
    comp = 1.0 - evaluator.faithfulness(valid & ~kept)
    s, c = min(max(suff, 0.0), 1.0), min(max(comp, 0.0), 1.0)
    f1 = 2 * s * c / (s + c) if s + c > 0 else 0.0
    return {"sufficiency": suff, "comprehensiveness": comp, "f1": f1}
