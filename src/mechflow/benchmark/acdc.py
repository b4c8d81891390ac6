"""ACDC: Automatic Circuit DisCovery (Conmy et al. 2023, NeurIPS), on mechflow's MIB edge graph.

Steps (the original sequential algorithm, ``acdc/TLACDCExperiment.py`` of the ACDC repository):

1. Start with every edge present; D(current) = D(full model) (0 for KL).
2. Visit receivers in reverse topological order, as the ACDC correspondence orders its nodes:
   logits; then for each layer from the last: its MLP input, the q inputs of heads H-1..0, the k
   inputs of heads H-1..0, the v inputs of heads H-1..0.
3. (``prune_dead``, original ACDC ``current_node_connected``) If the receiver's node (its head or
   MLP) has no present outgoing edge left, its output cannot reach the logits: remove all its
   incoming edges without evaluating them.
4. Otherwise, for each incoming edge, latest sender first (ACDC's parent order): remove it
   (patch it with the corrupted sender output), KEEPING every edge removed so far removed, and
   recompute everything downstream exactly. increase = D(after) - D(current). If increase < tau the
   edge stays removed and D(current) = D(after); otherwise it is restored.
5. One run per tau of the sweep gives one circuit per tau (ROC points).

Only edges of the restriction (`mechflow.benchmark.restriction`) are visited; all others stay
present. Differences from the ACDC repository: its internal node edges (q_input -> q, resid_mid ->
mlp_out; replacing a whole node at once) are not part of the MIB graph, as in auto-circuit and MIB;
``remove_redundant`` (off by default there) is not implemented.

Speed, without changing a decision:

* Every candidate of a receiver at layer L leaves layers before L clean, so evaluation starts
  from the cached clean residual at that stage (`ResumableForward`), computes final-position
  logits only, and caches patch sums that stay fixed for the stage.
* Speculation (``speculation = K > 1``): the next K candidates are evaluated in ONE batched
  forward, copy j removing candidates 1..j on top of the current circuit (the guess "all get
  removed"). Decisions are then taken in order exactly as in step 4; at the first kept edge the
  guess fails, later copies are discarded (counted in ``n_wasted``) and evaluation restarts after
  it. The decisions and D values are those of the sequential algorithm (up to float round-off of
  the batched matmuls). K halves after a failure and doubles after a success.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechflow.attribution.patching import PairBatch, check_batch
from mechflow.benchmark.config import AcdcConfig
from mechflow.benchmark.metrics import AcdcMetric
from mechflow.benchmark.restriction import EdgeRestriction
from mechflow.benchmark.resume import ResumableForward, StageCache
from mechflow.circuits.graph import EdgeGraph

log = logging.getLogger(__name__)


def receiver_order(graph: EdgeGraph) -> list[int]:
    """Receivers in ACDC's reverse topological order (step 2)."""
    order = [graph.logits_receiver]
    for L in reversed(range(graph.n_layers)):
        order.append(graph.mlp_receiver(L))
        for kind in "qkv":
            order += [graph.qkv_receiver(L, kind, h) for h in reversed(range(graph.n_heads))]
    return order


def node_sender(graph: EdgeGraph, receiver: int) -> int | None:
    """The sender index of the node a receiver feeds (None for the logits)."""
    if receiver == graph.logits_receiver:
        return None
    L, j = divmod(receiver, 3 * graph.n_heads + 1)
    return graph.mlp_sender(L) if j == 3 * graph.n_heads else graph.head_sender(L, j % graph.n_heads)


@dataclass
class AcdcStep:
    """One decision: edge ``sender -> receiver``; D before/after removing it (after = NaN when
    removed unevaluated because its node was dead)."""

    sender: int
    receiver: int
    metric_before: float
    metric_after: float
    removed: bool
    evaluated: bool

    @property
    def increase(self) -> float:
        return self.metric_after - self.metric_before


@dataclass
class AcdcRun:
    """ACDC at one tau. ``kept``: bool ``[n_senders, n_receivers]`` restricted edges kept."""

    threshold: float
    kept: Tensor
    steps: list[AcdcStep]
    metric: float
    n_forward: int
    n_evaluations: int
    n_wasted: int
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def n_kept(self) -> int:
        return int(self.kept.sum())

    @property
    def trajectory(self) -> list[float]:
        """D after each evaluated candidate, in visiting order."""
        return [s.metric_after for s in self.steps if s.evaluated]

    def summary(self, graph: EdgeGraph) -> dict:
        return {"threshold": self.threshold, "n_kept": self.n_kept, "metric": self.metric,
                "n_forward": self.n_forward, "n_evaluations": self.n_evaluations, "n_wasted": self.n_wasted,
                "n_decided_by_evaluation": sum(s.evaluated for s in self.steps),
                "seconds": self.seconds, "edges": graph.edge_names(self.kept), **self.extra}


class Acdc:
    """ACDC on one prompt batch; the clean state is cached once and shared by every tau.

    Args:
        model: HookedTransformer (edge-patchable, see `mechflow.circuits.forward.check_edge_model`).
        batch: clean/corrupted pairs with a per-prompt task metric (``PairBatch``).
        cfg: `AcdcConfig` (metric, speculation, max_batch_rows, prune_dead; thresholds unused here).
        restriction: edges ACDC may remove; default the whole graph.
    """

    def __init__(self, model, batch: PairBatch, cfg: AcdcConfig | None = None,
                 restriction: EdgeRestriction | None = None, graph: EdgeGraph | None = None):
        check_batch(batch)
        self.cfg = cfg or AcdcConfig()
        self.graph = graph or (restriction.graph if restriction else EdgeGraph.from_cfg(model.cfg))
        self.restriction = restriction or EdgeRestriction.build(self.graph)
        self.forward = ResumableForward(model, self.graph, batch.clean_tokens, batch.corrupted_tokens)
        self.metric = AcdcMetric(self.cfg.metric, self.forward.clean_last_logits, batch.metric)
        self.n = batch.clean_tokens.shape[0]
        self.full_metric = float(self.metric(self.forward.clean_last_logits.unsqueeze(0))[0])

    def run(self, threshold: float, progress: bool = False) -> AcdcRun:
        """ACDC at one tau (steps 1-4); taus are validated by the config (`AcdcConfig.thresholds`)."""
        tau = float(threshold)
        g, fwd, mask = self.graph, self.forward, self.restriction.mask
        k_max = max(1, min(self.cfg.speculation, self.cfg.max_batch_rows // self.n))
        removed = torch.zeros_like(g.valid)
        steps: list[AcdcStep] = []
        cache = StageCache()
        current = self.full_metric
        n_eval = n_wasted = 0
        f0, t0 = fwd.n_forward, time.perf_counter()
        k = k_max
        receivers = [r for r in receiver_order(g) if mask[:, r].any()]
        for r in tqdm(receivers, desc=f"ACDC tau={tau:g}", disable=not progress):
            senders = mask[:, r].nonzero().flatten().flip(0).tolist()  # latest sender first
            node = node_sender(g, r)
            if self.cfg.prune_dead and node is not None and not (g.valid[node] & ~removed[node]).any():
                removed[senders, r] = True
                steps += [AcdcStep(s, r, current, float("nan"), True, False) for s in senders]
                continue
            i = 0
            while i < len(senders):
                chunk = senders[i:i + k]
                cand = torch.zeros(len(chunk), g.n_senders)
                for j, s in enumerate(chunk):
                    cand[j:, s] = 1.0  # copy j removes chunk[0..j]
                values = self.metric(fwd.evaluate(removed, r, cand, cache)).tolist()
                n_eval += len(chunk)
                consumed = len(chunk)
                for j, s in enumerate(chunk):
                    after = values[j]
                    drop = after - current < tau
                    steps.append(AcdcStep(s, r, current, after, drop, True))
                    if drop:
                        removed[s, r] = True
                        current = after
                    else:
                        consumed = j + 1
                        break
                n_wasted += len(chunk) - consumed
                k = min(k_max, 2 * k) if consumed == len(chunk) else max(1, k // 2)
                i += consumed
        kept = mask & ~removed
        run = AcdcRun(tau, kept, steps, current, fwd.n_forward - f0, n_eval, n_wasted, time.perf_counter() - t0)
        log.info("ACDC tau=%g: kept %d/%d edges, D=%.4g, %d forwards (%d evaluations, %d wasted), %.1fs",
                 tau, run.n_kept, self.restriction.n_edges, current, run.n_forward, n_eval, n_wasted, run.seconds)
        return run

    def sweep(self, thresholds: Sequence[float] | None = None, progress: bool = False) -> list[AcdcRun]:
        """One `run` per tau (the config's thresholds by default)."""
        return [self.run(t, progress) for t in (self.cfg.thresholds if thresholds is None else thresholds)]


def roc_points(runs: list[AcdcRun], reference: Tensor, restriction: EdgeRestriction) -> list[dict]:
    """(FPR, TPR) of each run's kept edges against a reference circuit, within the restriction."""
    ref = reference.bool() & restriction.mask
    neg = restriction.mask & ~ref
    out = []
    for run in runs:
        tp = int((run.kept & ref).sum())
        fp = int((run.kept & neg).sum())
        out.append({"threshold": run.threshold, "tpr": tp / max(1, int(ref.sum())),
                    "fpr": fp / max(1, int(neg.sum()))})
    return out


def stage_costs(acdc: Acdc, n_points: int = 8, repeats: int = 2) -> dict:
    """ACDC's cost per candidate evaluation as a function of where it starts, measured.

    A candidate edge into a receiver of stage t is evaluated by a forward from stage t to the
    logits, so an edge into layer 0 costs about the whole model and one into the logits almost
    nothing: a per-edge cost measured on a late-layer restriction says little about the full
    graph. This times one evaluation batch (``speculation`` candidate copies, as ACDC runs them)
    starting at ``n_points`` evenly spaced stages (min of ``repeats``), fits
    ``seconds = a + b * (stages recomputed)`` by least squares, and returns the points and the fit.
    `depth_weighted_factor` turns it into a full-graph / restricted-graph cost ratio.
    """
    fwd, g = acdc.forward, acdc.graph
    k = max(1, min(acdc.cfg.speculation, acdc.cfg.max_batch_rows // acdc.n))
    n_stages = fwd.n_stages
    stages = sorted({round(i * (n_stages - 1) / max(1, n_points - 1)) for i in range(n_points)})
    removed = torch.zeros_like(g.valid)
    depth, seconds = [], []
    for t in stages:
        cur = fwd.cols(t).start
        senders = g.valid[:, cur].nonzero().flatten().tolist()
        cand = torch.zeros(k, g.n_senders)  # k copies at every stage (layer 0's q has one sender)
        for j in range(k):
            cand[j, senders[-1 - j % len(senders)]] = 1.0
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fwd.evaluate(removed, cur, cand, StageCache())
            best = min(best, time.perf_counter() - t0)
        depth.append(n_stages - t)
        seconds.append(best / k)
    fwd.n_forward -= len(stages) * repeats  # calibration is not part of any run's count
    x = torch.tensor(depth, dtype=torch.float64)
    y = torch.tensor(seconds, dtype=torch.float64)
    A = torch.stack([torch.ones_like(x), x], 1)
    a, b = torch.linalg.lstsq(A, y.unsqueeze(1)).solution.flatten().tolist()
    return {"stages": stages, "stages_recomputed": depth, "seconds_per_candidate": seconds,
            "candidates_per_batch": k, "fit": {"intercept_seconds": a, "seconds_per_stage": b},
            "model": "seconds per candidate = intercept + seconds_per_stage * (n_stages - start stage)"}


def depth_weighted_factor(costs: dict, acdc: Acdc, mask: Tensor) -> float:
    """(modelled ACDC cost of every edge of the graph) / (of the edges in ``mask``), each edge
    costing ``intercept + slope * stages recomputed from its receiver's stage`` (`stage_costs`).

    The linear fit can have a negative intercept, which would model the shallowest receivers (the
    logits) at a negative cost; each edge's modelled cost is floored at the smallest measured one."""
    fwd, g = acdc.forward, acdc.graph
    a, b = costs["fit"]["intercept_seconds"], costs["fit"]["seconds_per_stage"]
    floor = min(costs["seconds_per_candidate"])

    def total(m: Tensor) -> float:
        per_receiver = m.sum(0).double()
        cost = torch.tensor([max(floor, a + b * (fwd.n_stages - fwd.stage_of(r))) for r in range(g.n_receivers)],
                            dtype=torch.float64)
        return float((per_receiver * cost).sum())

    return total(g.valid) / total(mask & g.valid)
