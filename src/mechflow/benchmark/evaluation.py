"""Exact evaluation on the restricted edge graph, shared by every method of the comparison, and the
exhaustive exact reference (every restricted edge removed alone).

Restricted faithfulness. Edges outside the restriction are ALWAYS present. Budgets are fractions of
the RESTRICTED edge count ``n_R``: budget p keeps the top ``int(p/100 * n_R)`` restricted edges
(MIB's truncation) plus every unrestricted edge. f is normalised on the restricted graph:
``f(C) = (m(C + ~R) - m(~R)) / (m(N) - m(~R))`` where ``m(~R)`` removes every restricted edge, so
f(no restricted edge) = 0 and f(all) = 1 exactly, the bracket `minimal_faithful_prefix` assumes.
With the default restriction (the whole graph) this is MIB's f. (``acdc.json`` of `run_acdc`
normalises by the fully patched model instead; the two agree when the restriction is the graph.)

Reference positives (``benchmark.reference_threshold``): null (default) = the top-k restricted edges
by |effect| with k = the size of our found circuit (the same number of positives as our circuit
has edges); a number t = edges with ``|effect| > t * |m(N) - m(~R)|``. `ranking_inputs` turns a
method's scores and these positives into the inputs of `mechflow.benchmark.roc`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mechflow.attribution.patching import PairBatch
from mechflow.benchmark.restriction import EdgeRestriction
from mechflow.benchmark.resume import ResumableForward, StageCache
from mechflow.circuits.faithfulness import CircuitEvaluator, normalized_faithfulness, prefix_mask


@dataclass(frozen=True)
class _RestrictedShape:
    """What `faithfulness_curve` / `minimal_faithful_prefix` read of a graph, with n_edges = n_R."""

    n_edges: int
    n_senders: int
    n_receivers: int


class RestrictedEvaluator:
    """Exact evaluation on the restricted graph: ``kept`` = circuit + every unrestricted edge,
    f normalised by m(~R) (module docstring). Duck-types `CircuitEvaluator` for the curve/search."""

    def __init__(self, evaluator: CircuitEvaluator, restriction: EdgeRestriction):
        self.base, self.restriction = evaluator, restriction
        g = restriction.graph
        self.graph = _RestrictedShape(restriction.n_edges, g.n_senders, g.n_receivers)
        self.m_full = evaluator.m_full
        self.m_empty = evaluator.metric(restriction.full_kept(torch.zeros_like(g.valid)))
        if self.m_full == self.m_empty:
            raise ValueError("m(N) == m(~R): removing every restricted edge does not change the task "
                             "metric; faithfulness is undefined (widen benchmark.restriction)")

    @property
    def n_evaluations(self) -> int:
        return self.base.n_evaluations

    def metric(self, kept: Tensor) -> float:
        return self.base.metric(self.restriction.full_kept(kept))

    def faithfulness(self, kept: Tensor) -> float:
        return normalized_faithfulness(self.metric(kept), self.m_full, self.m_empty)


class ResumedRestrictedEvaluator:
    """`RestrictedEvaluator`'s values, computed from the clean state cached before the restriction.

    Every edge a restricted circuit removes ends at a restricted receiver, so everything before the
    first restricted receiver's stage is the clean run: each evaluation starts there from a cached
    residual (`ResumableForward`, ACDC's own inner loop, tested equal to `graph_forward`). ACDC gets
    this saving on the restricted graph, so our search gets it too; with no restriction it starts at
    the embedding and equals `CircuitEvaluator`. Setup: one corrupted and one clean forward.
    """

    def __init__(self, model, batch: PairBatch, restriction: EdgeRestriction):
        g = restriction.graph
        self.restriction, self.metric_fn = restriction, batch.metric
        self.graph = _RestrictedShape(restriction.n_edges, g.n_senders, g.n_receivers)
        self.forward = ResumableForward(model, g, batch.clean_tokens, batch.corrupted_tokens)
        self.first_receiver = int(restriction.mask.any(0).nonzero().min())
        self.n_evaluations = 0
        self.m_full = self._mean(self.forward.clean_last_logits)
        self.m_empty = self.metric(torch.zeros_like(g.valid))
        self.n_evaluations = 0
        if self.m_full == self.m_empty:
            raise ValueError("m(N) == m(~R): removing every restricted edge does not change the task "
                             "metric; faithfulness is undefined (widen benchmark.restriction)")

    def _mean(self, last_logits: Tensor) -> float:
        return float(self.metric_fn(last_logits.unsqueeze(1)).double().mean())

    @torch.no_grad()
    def metric(self, kept: Tensor) -> float:
        self.n_evaluations += 1
        return self._mean(self.forward.evaluate(self.restriction.removed(kept), self.first_receiver)[0])

    def faithfulness(self, kept: Tensor) -> float:
        return normalized_faithfulness(self.metric(kept), self.m_full, self.m_empty)


# ---------------------------------------------------------------------------- exhaustive reference
@torch.no_grad()
def exhaustive_effects(model, batch: PairBatch, restriction: EdgeRestriction,
                       max_batch_rows: int = 256) -> tuple[Tensor, float, int]:
    """Exact effect of removing each restricted edge ALONE: ``m(N without e) - m(N)``.

    Edges into one receiver share batched forwards (one copy per edge, started from the cached
    clean state at the receiver's stage, `ResumableForward`).

    Returns:
        effects: float64 ``[n_senders, n_receivers]``, NaN outside the restriction; m(N); number
        of forwards (the clean/corrupted caching forwards not included).
    """
    g = restriction.graph
    fwd = ResumableForward(model, g, batch.clean_tokens, batch.corrupted_tokens)
    n = batch.clean_tokens.shape[0]
    m_full = float(batch.metric(fwd.clean_last_logits.unsqueeze(1)).double().mean())
    effects = torch.full(g.valid.shape, float("nan"), dtype=torch.float64)
    none = torch.zeros_like(g.valid)
    k_max = max(1, max_batch_rows // n)
    f0 = fwd.n_forward
    for r in range(g.n_receivers):
        senders = restriction.mask[:, r].nonzero().flatten().tolist()
        for i in range(0, len(senders), k_max):
            chunk = senders[i:i + k_max]
            cand = torch.zeros(len(chunk), g.n_senders)
            cand[torch.arange(len(chunk)), chunk] = 1.0
            last = fwd.evaluate(none, r, cand, StageCache())
            for j, s in enumerate(chunk):
                effects[s, r] = float(batch.metric(last[j].unsqueeze(1)).double().mean()) - m_full
    return effects, m_full, fwd.n_forward - f0


def reference_positives(effects: Tensor, restriction: EdgeRestriction, k: int,
                        threshold: float | None, scale: float) -> Tensor:
    """Bool mask of reference-circuit edges (module docstring)."""
    if threshold is None:
        order = restriction.ranked(torch.nan_to_num(effects, nan=0.0))
        return prefix_mask(order, k, restriction.graph)
    return restriction.mask & (torch.nan_to_num(effects, nan=0.0).abs() > threshold * abs(scale))



def ranking_inputs(scores: Tensor, positives: Tensor, restriction: EdgeRestriction) -> tuple[np.ndarray, np.ndarray]:
    """``|scores|`` (NaN as 0) and the reference labels of the restricted edges, as float64 and bool
    vectors: what `mechflow.benchmark.roc.roc_auc` / `roc_curve` rank."""
    sel = restriction.mask
    s = torch.nan_to_num(scores[sel].double().abs(), nan=0.0)
    return s.numpy(), positives[sel].bool().numpy()
