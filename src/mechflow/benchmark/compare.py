"""``run_benchmark``: ACDC, EAP, EAP-IG, our minimal faithful circuit and exhaustive exact patching,
side by side on ONE restricted edge graph and ONE prompt batch (MIB, Mueller et al. 2025; ACDC,
Conmy et al. 2023; EAP, Syed et al. 2023; EAP-IG, Hanna et al. 2024).

Steps:

1. Validate the config (``benchmark`` group; the comparison settings ride ``benchmark.compare``,
   `CompareConfig`); load the model and the first ``n_prompts`` pairs of the largest equal-length
   bucket; build the restriction once and hand the same object to every method.
2. After one untimed EAP pass (warm-up), time every method on that batch: ACDC at each tau (`Acdc.sweep`,
   setup timed separately), EAP,
   EAP-IG, ours (EAP-IG scores, restricted ranking, exact bracketed bisection for f >= target,
   `minimal_faithful_prefix`) and the exhaustive reference (`exhaustive_effects`: every restricted
   edge removed ALONE, everything else intact, exact, several edges per batched forward).
3. Evaluate every method exactly on the restricted graph (see "Restricted faithfulness"):
   faithfulness curve at the MIB budgets, CPR and CMD (`area_metrics`), edge ROC AUC against the
   exhaustive reference.
4. Headline: ACDC time at the matched tau / our discovery time, with the arithmetic, and the
   full graph for every method (`full_graph_table`): EAP, EAP-IG and ours measured over all edges
   in the same run; ACDC and exhaustive patching extrapolated from their restricted times, weighted
   by the measured cost of a forward resumed at each receiver's depth.
5. Write ``table.csv``, ``table.tex``, ``timings.json``, ``roc.png``, ``faithfulness_curves.png``
   and, last (completion marker), ``benchmark.md``, each atomically, to exactly the paths the caller
   names (the rule's outputs; `benchmark_outputs(folder)` gives these default names in one folder).

Restricted faithfulness. Edges outside the restriction are ALWAYS present. Budgets are fractions of
the RESTRICTED edge count ``n_R``: budget p keeps the top ``int(p/100 * n_R)`` restricted edges
(MIB's truncation) plus every unrestricted edge. f is normalised on the restricted graph:
``f(C) = (m(C + ~R) - m(~R)) / (m(N) - m(~R))`` where ``m(~R)`` removes every restricted edge, so
f(no restricted edge) = 0 and f(all) = 1 exactly, the bracket `minimal_faithful_prefix` assumes.
With the default restriction (the whole graph) this is MIB's f. (``acdc.json`` of `run_acdc`
normalises by the fully patched model instead; the two agree when the restriction is the graph.)

Method scores for curves and ROC: EAP / EAP-IG |score|; the reference |effect|; ACDC (which gives
circuits, not scores) ranks an edge by the number of taus whose circuit keeps it, ties broken by
|D increase| when it was evaluated in the smallest-tau run. ACDC's ROC instead uses its tau sweep's
(FPR, TPR) points plus (0, 0) and (1, 1), area by trapezoid over points sorted by (FPR, TPR).

Reference positives (``compare.reference_threshold``): null (default) = the top-k restricted edges
by |effect| with k = the size of our found circuit (the same number of positives as our circuit
has edges); a number t = edges with ``|effect| > t * |m(N) - m(~R)|``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import platform
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechflow.attribution.patching import PairBatch
from mechflow.benchmark.acdc import Acdc, AcdcRun, depth_weighted_factor, roc_points, stage_costs
from mechflow.benchmark.config import BenchmarkConfig
from mechflow.benchmark.restriction import EdgeRestriction
from mechflow.benchmark.resume import ResumableForward, StageCache
from mechflow.circuits.eap import edge_scores
from mechflow.circuits.faithfulness import (
    MIB_PERCENTAGES,
    CircuitEvaluator,
    area_metrics,
    faithfulness_curve,
    normalized_faithfulness,
    prefix_mask,
    ranked_edges,
)
from mechflow.circuits.graph import EdgeGraph
from mechflow.circuits.search import check_target, minimal_faithful_prefix
from mechflow.config import is_int, is_number
from mechflow.contracts.benchmark import TimingsDocument
from mechflow.contracts.documents import write_document
from mechflow.contracts.versions import SCHEMA_VERSION
from mechflow.errors import ConfigError, DataError, check_known_keys
from mechflow.io import atomic_path, atomic_write_text, canonical_hash, outputs_in

log = logging.getLogger(__name__)

TABLE_CSV, TABLE_TEX, TIMINGS_JSON = "table.csv", "table.tex", "timings.json"
ROC_PNG, CURVES_PNG, BENCHMARK_MD = "roc.png", "faithfulness_curves.png", "benchmark.md"
COLUMNS = ("method", "seconds", "n_forward", "n_backward", "n_edges_in_circuit", "faithfulness", "cpr",
           "cmd", "roc_auc")
TIMING_COLUMNS = ("seconds",)
# Output name (the rule's `output:` name, the stage function's keyword) -> default file name.
BENCHMARK_OUTPUTS = {"table": TABLE_CSV, "table_tex": TABLE_TEX, "timings": TIMINGS_JSON, "summary": BENCHMARK_MD,
                     "roc": ROC_PNG, "curves": CURVES_PNG}
MATCH = ("closest", "at_least")


@dataclass(frozen=True)
class CompareConfig:
    """``benchmark.compare``: settings of the side-by-side comparison.

    Attributes:
        target: our circuit is the shortest EAP-IG prefix found with restricted f >= target.
        ig_steps, ig_rule: EAP-IG interpolation (`mechflow.circuits.eap.edge_scores`).
        percentages: MIB edge budgets, percent of the RESTRICTED edge count, increasing.
        reference_threshold: null = top-k reference positives with k = our circuit's size;
            t > 0 = edges whose single removal moves the metric by more than t |m(N) - m(~R)|.
        acdc_match: which tau is compared with ours: ``closest`` (restricted f closest to ours,
            ties to the larger tau) or ``at_least`` (the largest tau whose f >= ours, i.e. ACDC's
            sparsest circuit at least as faithful; falls back to ``closest`` when none is).
    """

    target: float = 0.8
    ig_steps: int = 5
    ig_rule: str = "left"
    percentages: tuple[float, ...] = MIB_PERCENTAGES
    reference_threshold: float | None = None
    acdc_match: str = "closest"

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> CompareConfig:
        cfg = dict(cfg or {})
        check_known_keys("benchmark.compare", cfg, cls)
        if "percentages" in cfg:
            p = cfg["percentages"]
            if isinstance(p, (str, bytes)) or not hasattr(p, "__iter__") or not list(p):
                raise ConfigError(f"benchmark.compare.percentages: {p!r} must be a non-empty list of "
                                  "percent budgets, e.g. [0.1, 1, 10, 100]")
            cfg["percentages"] = tuple(p)
        out = cls(**cfg)
        try:
            check_target(out.target)
        except ConfigError as e:
            raise ConfigError(str(e).replace("circuits.target", "benchmark.compare.target")) from None
        if not is_int(out.ig_steps) or out.ig_steps < 1:
            raise ConfigError(f"benchmark.compare.ig_steps: {out.ig_steps!r} must be an integer >= 1")
        if out.ig_rule not in ("left", "midpoint"):
            raise ConfigError(f"benchmark.compare.ig_rule: {out.ig_rule!r} must be left or midpoint")
        ps = out.percentages
        if not all(is_number(x) and 0 < x <= 100 for x in ps) or any(b <= a for a, b in pairwise(ps)):
            raise ConfigError(f"benchmark.compare.percentages: {list(ps)!r} must be strictly increasing "
                              "numbers in (0, 100]")
        t = out.reference_threshold
        if t is not None and (not is_number(t) or t <= 0):
            raise ConfigError(f"benchmark.compare.reference_threshold: {t!r} must be null (top-k, k = "
                              "our circuit size) or a number > 0 (fraction of |m(N) - m(~R)|)")
        if out.acdc_match not in MATCH:
            raise ConfigError(f"benchmark.compare.acdc_match: {out.acdc_match!r} must be one of {list(MATCH)}")
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["percentages"] = list(self.percentages)
        return d


def parse_config(cfg: Mapping[str, Any] | None) -> tuple[BenchmarkConfig, CompareConfig]:
    """Split the ``benchmark`` group into the ACDC/restriction config and ``compare``."""
    cfg = {k: v for k, v in dict(cfg or {}).items() if k not in ("enabled", "tasks")}  # read by the rule
    cmp = CompareConfig.from_dict(cfg.pop("compare", None))
    return BenchmarkConfig.from_dict(cfg), cmp


# ---------------------------------------------------------------------------- restricted evaluation
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


# ---------------------------------------------------------------------------- ROC
def roc_auc(scores: Tensor, positives: Tensor, restriction: EdgeRestriction) -> float | None:
    """Area under the ROC of ``|scores|`` over restricted edges (Mann-Whitney, ties count 1/2);
    None when the reference has no positive or no negative."""
    sel = restriction.mask
    s = torch.nan_to_num(scores[sel].double().abs(), nan=0.0)
    y = positives[sel].bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    pos, neg = s[y], s[~y]
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (n_pos * n_neg))


def roc_curve(scores: Tensor, positives: Tensor, restriction: EdgeRestriction) -> list[tuple[float, float]]:
    """(FPR, TPR) points of thresholding ``|scores|`` at every distinct value, from (0, 0)."""
    sel = restriction.mask
    s = torch.nan_to_num(scores[sel].double().abs(), nan=0.0)
    y = positives[sel].bool()
    n_pos, n_neg = max(1, int(y.sum())), max(1, int((~y).sum()))
    pts = [(0.0, 0.0)]
    for v in torch.unique(s).flip(0).tolist():
        above = s >= v
        pts.append((int((above & ~y).sum()) / n_neg, int((above & y).sum()) / n_pos))
    return pts


def step_auc(points: list[tuple[float, float]]) -> float:
    """Trapezoid area over (FPR, TPR) points plus (0, 0) and (1, 1), sorted by (FPR, TPR)."""
    pts = sorted({(0.0, 0.0), (1.0, 1.0), *points})
    return float(sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in pairwise(pts)))


def acdc_scores(runs: list[AcdcRun], restriction: EdgeRestriction) -> Tensor:
    """ACDC edge ranking score: taus keeping the edge + |increase| at the smallest tau / (1 + it)."""
    score = torch.zeros(restriction.mask.shape, dtype=torch.float64)
    for run in runs:
        score += run.kept.double()
    first = min(runs, key=lambda r: r.threshold)
    for s in first.steps:
        if s.evaluated and math.isfinite(s.increase):
            score[s.sender, s.receiver] += abs(s.increase) / (1 + abs(s.increase))
    return restriction.restrict_scores(score)


def benchmark_outputs(folder: str | Path) -> dict[str, Path]:
    """`run_benchmark`'s (and `compare_methods`') output paths with their default file names in
    `folder` (library and test callers: ``run_benchmark(cfg, ..., **benchmark_outputs(folder))``)."""
    return outputs_in(folder, BENCHMARK_OUTPUTS)


# ---------------------------------------------------------------------------- the comparison
def compare_methods(model, batch: PairBatch, bench: BenchmarkConfig, cmp: CompareConfig, *, table: Path,
                    table_tex: Path, timings: Path, summary: Path, roc: Path, curves: Path,
                    meta: dict | None = None, graph: EdgeGraph | None = None) -> dict:
    """Steps 2-5 on an already-selected batch; returns the ``timings.json`` document.

    ``table``, ``table_tex``, ``timings``, ``summary``, ``roc``, ``curves``: the paths written
    (``table.csv``, ``table.tex``, ``timings.json``, ``benchmark.md``, ``roc.png``,
    ``faithfulness_curves.png``; `benchmark_outputs(folder)` gives these names in one folder).
    """
    out = {"table": Path(table), "table_tex": Path(table_tex), "timings": Path(timings), "summary": Path(summary),
           "roc": Path(roc), "curves": Path(curves)}  # before the body reuses the name `curves`
    graph = graph or EdgeGraph.from_cfg(model.cfg)
    restriction = EdgeRestriction.build(graph, bench.restriction)
    n_r, n_prompts = restriction.n_edges, int(batch.clean_tokens.shape[0])

    # untimed warm-up (3 forwards, 1 backward) so that no method pays torch's first-call costs
    edge_scores(model, batch, "eap", graph=graph)

    # ACDC (setup: corrupted recording + clean caching forward, shared by every tau)
    t0 = time.perf_counter()
    acdc = Acdc(model, batch, bench.acdc, restriction)
    acdc_setup = time.perf_counter() - t0
    log.info("ACDC on %d restricted edges, %d taus (setup %.1fs)", n_r, len(bench.acdc.thresholds), acdc_setup)
    runs = acdc.sweep(bench.acdc.thresholds, progress=True)
    costs = stage_costs(acdc)  # untimed calibration for the full-graph extrapolation
    depth_factor = depth_weighted_factor(costs, acdc, restriction.mask)

    # EAP and EAP-IG (forwards: corrupted + clean recording, then one forward+backward per point;
    # the backward stops at the restriction's first receiver layer: no restricted edge needs more)
    from_layer = restriction.first_receiver_layer
    t0 = time.perf_counter()
    eap = edge_scores(model, batch, "eap", graph=graph, from_layer=from_layer)
    eap_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ig = edge_scores(model, batch, "eap-ig", steps=cmp.ig_steps, rule=cmp.ig_rule, graph=graph,
                     from_layer=from_layer)
    ig_s = time.perf_counter() - t0
    log.info("EAP %.1fs, EAP-IG (%d steps) %.1fs, backward from layer %d", eap_s, cmp.ig_steps, ig_s, from_layer)

    # ours: EAP-IG ranking over the restricted edges + exact bisection (own evaluator, timed)
    t0 = time.perf_counter()
    ours_ev = ResumedRestrictedEvaluator(model, batch, restriction)
    ig_order = restriction.ranked(ig)
    found = minimal_faithful_prefix(ours_ev, ig_order, cmp.target, cmp.percentages)
    search_s = time.perf_counter() - t0
    search_fwd = 3 + ours_ev.n_evaluations  # corrupted + clean caching + m(~R) + every exact evaluation
    ours_circuit = prefix_mask(ig_order, found.n_edges, graph)
    log.info("ours: %d edges, search %.1fs (%d exact evaluations)", found.n_edges, search_s, ours_ev.n_evaluations)

    # ours on the FULL graph (same EAP-IG scores, all edges ranked): the full-graph time is measured
    if restriction.n_edges < graph.n_edges:
        t0 = time.perf_counter()
        edge_scores(model, batch, "eap", graph=graph)  # full-depth backward: the full graph's EAP cost
        eap_full_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ig_full = edge_scores(model, batch, "eap-ig", steps=cmp.ig_steps, rule=cmp.ig_rule, graph=graph)
        ig_full_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        full_ev = CircuitEvaluator(model, batch, graph)
        full_found = minimal_faithful_prefix(full_ev, ranked_edges(ig_full, graph), cmp.target, cmp.percentages)
        full_search_s = time.perf_counter() - t0
        full_graph_ours = {"measured": True, "search_seconds": full_search_s, "eap_ig_seconds": ig_full_s,
                           "eap_seconds": eap_full_s,
                           "seconds": ig_full_s + full_search_s, "n_evaluations": full_found.n_evaluations,
                           "n_edges": full_found.n_edges, "faithfulness": full_found.faithfulness}
        log.info("ours on the full graph: %d edges, f=%.3f, search %.1fs", full_found.n_edges,
                 full_found.faithfulness, full_search_s)
    else:
        full_graph_ours = {"measured": True, "same_as_restricted": True, "seconds": ig_s + search_s,
                           "eap_seconds": eap_s, "eap_ig_seconds": ig_s}

    # exhaustive exact reference
    t0 = time.perf_counter()
    effects, m_full_ref, ex_fwd = exhaustive_effects(model, batch, restriction, bench.acdc.max_batch_rows)
    ex_s = time.perf_counter() - t0
    log.info("exhaustive reference: %d edges in %.1fs", n_r, ex_s)

    # evaluation (not counted as any method's cost)
    ev = RestrictedEvaluator(CircuitEvaluator(model, batch, graph), restriction)
    positives = reference_positives(effects, restriction, found.n_edges, cmp.reference_threshold,
                                    ev.m_full - ev.m_empty)
    scores = {"eap": restriction.restrict_scores(eap), "eap-ig": restriction.restrict_scores(ig),
              "exhaustive": effects, "acdc": acdc_scores(runs, restriction)}
    curves = {name: faithfulness_curve(ev, restriction.ranked(s.nan_to_num(0.0)), cmp.percentages)
              for name, s in scores.items()}
    areas = {name: area_metrics(c) for name, c in curves.items()}
    aucs = {name: roc_auc(s, positives, restriction) for name, s in scores.items() if name != "acdc"}
    acdc_roc = roc_points(runs, positives, restriction)
    aucs["acdc"] = step_auc([(p["fpr"], p["tpr"]) for p in acdc_roc])

    acdc_f = [ev.faithfulness(run.kept) for run in runs]
    matched, match_rule = _match_tau(runs, acdc_f, found.faithfulness, cmp.acdc_match)
    topk = {name: ev.faithfulness(prefix_mask(restriction.ranked(scores[name].nan_to_num(0.0)),
                                              found.n_edges, graph)) for name in ("eap", "exhaustive")}

    n_ig_fwd = 2 + cmp.ig_steps
    rows = [
        _row(f"acdc (tau={runs[matched].threshold:g})", acdc_setup + runs[matched].seconds,
             2 + runs[matched].n_forward, 0, runs[matched].n_kept, acdc_f[matched], areas["acdc"], aucs["acdc"]),
        _row("eap", eap_s, 3, 1, found.n_edges, topk["eap"], areas["eap"], aucs["eap"]),
        _row("eap-ig", ig_s, n_ig_fwd, cmp.ig_steps, found.n_edges, found.faithfulness, areas["eap-ig"],
             aucs["eap-ig"]),
        _row("ours (eap-ig + search)", ig_s + search_s, n_ig_fwd + search_fwd, cmp.ig_steps, found.n_edges,
             found.faithfulness, areas["eap-ig"], aucs["eap-ig"]),
        _row("exhaustive patching", ex_s, 2 + ex_fwd, 0, found.n_edges, topk["exhaustive"], areas["exhaustive"],
             aucs["exhaustive"]),
    ]

    acdc_time = acdc_setup + runs[matched].seconds
    ours_time = ig_s + search_s
    per_edge = runs[matched].seconds / n_r
    headline = {
        "acdc_tau": runs[matched].threshold, "acdc_match": match_rule,
        "acdc_seconds": acdc_time, "acdc_setup_seconds": acdc_setup, "acdc_run_seconds": runs[matched].seconds,
        "ours_seconds": ours_time, "eap_ig_seconds": ig_s, "search_seconds": search_s,
        "ratio": acdc_time / ours_time,
        "arithmetic": f"({acdc_setup:.4f} s setup + {runs[matched].seconds:.4f} s ACDC at tau="
                      f"{runs[matched].threshold:g}) / ({ig_s:.4f} s EAP-IG + {search_s:.4f} s search) = "
                      f"{acdc_time:.4f} / {ours_time:.4f} = {acdc_time / ours_time:.3f}",
        "acdc_sweep_ratio": (acdc_setup + sum(r.seconds for r in runs)) / ours_time,
        "acdc_faithfulness": acdc_f[matched], "ours_faithfulness": found.faithfulness,
        "acdc_cpr": areas["acdc"]["cpr"], "ours_cpr": areas["eap-ig"]["cpr"],
    }
    full_graph = full_graph_table(runs[matched], ex_s, n_r, graph.n_edges, depth_factor, full_graph_ours)
    acdc_full = full_graph[0]  # the one place the depth-weighted ACDC estimate is computed
    extrapolation = {
        "measured": False,
        "acdc_seconds_per_restricted_edge": per_edge, "n_edges_restricted": n_r, "n_edges_full": graph.n_edges,
        "acdc_full_graph_seconds_estimate": per_edge * graph.n_edges,
        "arithmetic": f"{runs[matched].seconds:.4f} s / {n_r} restricted edges = {per_edge:.6g} s/edge; "
                      f"x {graph.n_edges} full-graph edges = {per_edge * graph.n_edges:.4f} s",
        "caveat": "ACDC's cost per edge grows for receivers in earlier layers (more of the model is "
                  "recomputed); a late-layer restriction underestimates the full-graph time. The "
                  "depth-weighted estimate corrects for that with measured per-stage costs; both assume "
                  "the restriction's share of edges decided without an evaluation (dead nodes) and of "
                  "wasted speculative copies.",
        "stage_costs": costs,
        "depth_weight_factor": depth_factor,
        "acdc_full_graph_seconds_depth_weighted": acdc_full["seconds"],
        "depth_weighted_arithmetic": f"{runs[matched].seconds:.4f} s x {depth_factor:.4g} (sum over all edges "
                                     f"of the fitted per-candidate cost at the receiver's stage / the same "
                                     f"sum over the restricted edges) = {acdc_full['seconds']:.1f} s",
        "ours_full_graph": full_graph_ours,
        "full_graph_ratio_depth_weighted": acdc_full["ratio_to_ours"],
        "full_graph_ratio": per_edge * graph.n_edges / full_graph_ours["seconds"],
        "full_graph_ratio_arithmetic": f"{per_edge * graph.n_edges:.1f} s ACDC (extrapolated) / "
                                       f"{full_graph_ours['seconds']:.1f} s ours (measured) = "
                                       f"{per_edge * graph.n_edges / full_graph_ours['seconds']:.1f}",
    }
    doc = {
        "schema_version": SCHEMA_VERSION, **(meta or {}),
        "config": {"benchmark": bench.to_dict(), "compare": cmp.to_dict()},
        "config_hash": canonical_hash({"benchmark": bench.to_dict(), "compare": cmp.to_dict()}),
        "n_prompts": n_prompts, "n_pos": int(batch.clean_tokens.shape[1]),
        "restriction": asdict(restriction.spec), "n_edges_restricted": n_r, "n_edges_full": graph.n_edges,
        "normalisation": {"m_full": ev.m_full, "m_restricted_empty": ev.m_empty,
                          "definition": "f(C) = (m(C + ~R) - m(~R)) / (m(N) - m(~R)); edges outside R always kept"},
        "machine": _machine(),
        "acdc": {"setup_seconds": acdc_setup, "matched_index": matched, "runs": [
            {"threshold": r.threshold, "seconds": r.seconds, "n_forward": r.n_forward,
             "n_evaluations": r.n_evaluations, "n_wasted": r.n_wasted, "n_kept": r.n_kept,
             "acdc_metric": r.metric, "faithfulness": f, **roc}
            for r, f, roc in zip(runs, acdc_f, acdc_roc)]},
        "eap": {"seconds": eap_s, "n_forward": 3, "n_backward": 1, "backward_from_layer": from_layer},
        "eap_ig": {"seconds": ig_s, "n_forward": n_ig_fwd, "n_backward": cmp.ig_steps, "steps": cmp.ig_steps,
                   "backward_from_layer": from_layer},
        "ours": {"eap_ig_seconds": ig_s, "search_seconds": search_s, "search_forwards": search_fwd,
                 "n_evaluations": found.n_evaluations, "n_edges": found.n_edges,
                 "faithfulness": found.faithfulness, "faithfulness_one_fewer": found.faithfulness_one_fewer,
                 "target": cmp.target, "edges": graph.edge_names(ours_circuit)},
        "exhaustive": {"seconds": ex_s, "n_forward": 2 + ex_fwd, "m_full": m_full_ref,
                       "n_positives": int(positives.sum()),
                       "positives_rule": "top-k |effect|, k = ours" if cmp.reference_threshold is None else
                       f"|effect| > {cmp.reference_threshold} |m(N) - m(~R)|"},
        "curves": {name: [asdict(p) for p in c] for name, c in curves.items()},
        "areas": areas, "roc_auc": aucs, "headline": headline, "full_graph_extrapolation": extrapolation,
        "full_graph": full_graph,
        "table": rows,
    }
    _write_outputs(out, doc, rows, curves, scores, positives, restriction, acdc_roc, aucs)
    return doc


def _match_tau(runs: list[AcdcRun], fs: list[float], ours: float, rule: str) -> tuple[int, str]:
    idx = list(range(len(runs)))
    if rule == "at_least":
        ok = [i for i in idx if fs[i] >= ours]
        if ok:
            return max(ok, key=lambda i: runs[i].threshold), "at_least: largest tau with f >= ours"
        rule = "closest (no tau reaches ours)"
    best = min(idx, key=lambda i: (abs(fs[i] - ours), -runs[i].threshold))
    return best, "closest: |f_acdc - f_ours| smallest, ties to the larger tau" if rule == "closest" else rule


def full_graph_table(acdc_run: AcdcRun, exhaustive_seconds: float, n_restricted: int, n_full: int,
                     depth_factor: float, ours_full: dict) -> list[dict]:
    """Every method's time on the FULL graph: measured where the run measured it (EAP, EAP-IG, ours),
    else extrapolated from the restricted run (ACDC, exhaustive patching), with the arithmetic.

    Both extrapolations scale the restricted time by ``depth_factor`` (`depth_weighted_factor`): ACDC
    and exhaustive patching evaluate each edge by a forward resumed at its receiver's stage, so an
    edge costs more the earlier its receiver, and a per-edge average over late layers
    underestimates the full graph. Exhaustive patching decides no edge for free (ACDC skips edges
    into dead nodes), so its estimate is the tighter of the two.
    """
    ours = ours_full["seconds"]

    def row(method: str, seconds: float, measured: bool, arithmetic: str) -> dict:
        return {"method": method, "seconds": seconds, "measured": measured, "ratio_to_ours": seconds / ours,
                "arithmetic": arithmetic}

    return [
        row(f"acdc (tau={acdc_run.threshold:g})", acdc_run.seconds * depth_factor, False,
            f"{acdc_run.seconds:.4f} s on {n_restricted} restricted edges x depth factor {depth_factor:.4g}"),
        row("eap", ours_full["eap_seconds"], True, "measured: 3 forwards, 1 backward through every layer"),
        row("eap-ig", ours_full["eap_ig_seconds"], True, "measured: backward through every layer per step"),
        row("ours (eap-ig + search)", ours, True, "measured: EAP-IG over every edge + exact bisection"),
        row("exhaustive patching", exhaustive_seconds * depth_factor, False,
            f"{exhaustive_seconds:.4f} s on {n_restricted} restricted edges x depth factor {depth_factor:.4g} "
            f"(every one of the {n_full} edges alone)"),
    ]


def _row(method, seconds, n_forward, n_backward, n_edges, f, area, auc) -> dict:
    return {"method": method, "seconds": seconds, "n_forward": n_forward, "n_backward": n_backward,
            "n_edges_in_circuit": n_edges, "faithfulness": f, "cpr": area["cpr"], "cmd": area["cmd"],
            "roc_auc": auc}


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


# ---------------------------------------------------------------------------- outputs
def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _write_outputs(out: Mapping[str, Path], doc: dict, rows: list[dict], curves: dict, scores: dict,
                   positives: Tensor, restriction: EdgeRestriction, acdc_roc: list[dict], aucs: dict) -> None:
    """Write the `BENCHMARK_OUTPUTS` files to the paths in `out` (output name -> path), each atomically;
    the summary last (completion marker)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([_fmt(r[c]) for c in COLUMNS])
    atomic_write_text(out["table"], buf.getvalue())
    atomic_write_text(out["table_tex"], _latex(rows))
    write_document(out["timings"], TimingsDocument, doc)
    _plots(out, curves, scores, positives, restriction, acdc_roc, aucs)
    atomic_write_text(out["summary"], _markdown(doc, rows))


def _latex(rows: list[dict]) -> str:
    head = ["method", "s", "fwd", "bwd", "edges", "$f$", "CPR", "CMD", "AUC"]
    lines = [r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}", r"\toprule", " & ".join(head) + r" \\",
             r"\midrule"]
    for r in rows:
        cells = [r["method"].replace("_", r"\_")] + [_fmt(r[c]) or "--" for c in COLUMNS[1:]]
        lines.append(" & ".join(cells) + r" \\")
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}", ""])


def _plots(out: Mapping[str, Path], curves: dict, scores: dict, positives: Tensor, restriction: EdgeRestriction,
           acdc_roc: list[dict], aucs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for name in ("eap", "eap-ig", "exhaustive"):
        xs, ys = zip(*roc_curve(scores[name], positives, restriction), (1.0, 1.0))
        ax.plot(xs, ys, label=f"{name} (AUC {_fmt(aucs[name])})")
    pts = sorted({(0.0, 0.0), (1.0, 1.0), *((p["fpr"], p["tpr"]) for p in acdc_roc)})
    ax.plot(*zip(*pts), marker="o", label=f"acdc tau sweep (AUC {_fmt(aucs['acdc'])})")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="edge ROC vs exhaustive patching")
    ax.legend(fontsize=7)
    _savefig(fig, out["roc"])
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, c in curves.items():
        ax.plot([p.percent for p in c], [p.faithfulness for p in c], marker=".", label=name)
    ax.set(xscale="log", xlabel="% of restricted edges kept", ylabel="restricted faithfulness f",
           title="faithfulness at MIB budgets")
    ax.legend(fontsize=7)
    _savefig(fig, out["curves"])
    plt.close("all")


def _savefig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def _markdown(doc: dict, rows: list[dict]) -> str:
    h, x = doc["headline"], doc["full_graph_extrapolation"]
    lines = [
        "# Circuit discovery benchmark", "",
        (f"Restriction {doc['restriction']}: {doc['n_edges_restricted']} of {doc['n_edges_full']} edges "
         f"(edges outside it always kept; budgets are % of the restricted edges); {doc['n_prompts']} prompts "
         f"of {doc['n_pos']} tokens; torch threads {doc['machine']['torch_threads']}. Source: `{TIMINGS_JSON}`."), "",
        f"Per-method table: `{TABLE_CSV}` (LaTeX: `{TABLE_TEX}`); curves: `{CURVES_PNG}`; ROC: `{ROC_PNG}`.", "",
        "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows), "",
        f"## Headline (`{TIMINGS_JSON}` -> headline)", "",
        (f"ACDC tau matched to ours by {h['acdc_match']}: tau={h['acdc_tau']:g}, "
         f"f={h['acdc_faithfulness']:.4g} (ours f={h['ours_faithfulness']:.4g})."), "",
        f"ACDC time / our discovery time = {h['arithmetic']}.", "",
        (f"Whole ACDC sweep / ours = {h['acdc_sweep_ratio']:.3f}. CPR: ACDC {h['acdc_cpr']:.4g}, "
         f"ours (EAP-IG ranking) {h['ours_cpr']:.4g}."), "",
        f"## Full-graph extrapolation (`{TIMINGS_JSON}` -> full_graph_extrapolation)", "",
        f"ACDC estimate (not measured): {x['arithmetic']}. {x['caveat']}", "",
        (f"Ours on the full graph (measured in this run: EAP-IG over every edge + exact bisection): "
         f"{x['ours_full_graph']['seconds']:.1f} s"
         + (f", {x['ours_full_graph']['n_edges']} edges, f={x['ours_full_graph']['faithfulness']:.4g}"
            if "n_edges" in x["ours_full_graph"] else "")
         + f". Full-graph ratio: {x['full_graph_ratio_arithmetic']}."), "",
        (f"Depth-weighted ACDC estimate (per-candidate cost measured at {len(x['stage_costs']['stages'])} "
         f"start stages, linear fit): {x['depth_weighted_arithmetic']}; full-graph ratio "
         f"{x['full_graph_ratio_depth_weighted']:.1f}."), "",
        f"## Every method on the full graph (`{TIMINGS_JSON}` -> full_graph)", "",
        "| method | seconds | measured | / ours | arithmetic |", "|---|---|---|---|---|",
        *(f"| {r['method']} | {r['seconds']:.1f} | {'yes' if r['measured'] else 'no (extrapolated)'} | "
          f"{r['ratio_to_ours']:.2f} | {r['arithmetic']} |" for r in doc["full_graph"]), "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- stage
def run_benchmark(cfg: dict, *, model_cfg: dict, dataset: Path, table: Path, table_tex: Path, timings: Path,
                  summary: Path, roc: Path, curves: Path, model: Any = None) -> dict:
    """Run steps 1-5; returns the ``timings.json`` document.

    Args:
        cfg: the ``benchmark`` config group (`BenchmarkConfig` keys plus ``compare``, `CompareConfig`).
        model_cfg: the resolved ``model`` group.
        dataset: ``dataset.jsonl`` written by ``prepare_task`` for this model.
        table, table_tex, timings, summary, roc, curves: the paths written (folders created):
            ``table.csv``, ``table.tex``, ``timings.json``, ``benchmark.md``, ``roc.png``,
            ``faithfulness_curves.png``; `benchmark_outputs(folder)` gives these names in one folder.
        model: an already-loaded `LoadedModel` (default: load from ``model_cfg``).
    """
    from mechflow.benchmark.core import load_task_batch

    bench, cmp = parse_config(cfg)
    dataset = Path(dataset)
    loaded, ds, batch = load_task_batch(model_cfg, dataset, bench.n_prompts, model)
    meta = {"model": model_cfg, "task": ds.name, "prompt_ids": list(batch.example_ids)}
    try:
        return compare_methods(loaded.model, batch, bench, cmp, table=table, table_tex=table_tex, timings=timings,
                               summary=summary, roc=roc, curves=curves, meta=meta)
    except ValueError as e:
        if "faithfulness is undefined" in str(e):
            raise DataError(f"{dataset}: {e}") from None
        raise
