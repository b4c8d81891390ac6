"""`compare_methods`: ACDC, EAP, EAP-IG, our minimal faithful circuit and exhaustive exact patching,
side by side on ONE restricted edge graph and ONE prompt batch (MIB, Mueller et al. 2025; ACDC,
Conmy et al. 2023; EAP, Syed et al. 2023; EAP-IG, Hanna et al. 2024). The stage function
(`mechflow.benchmark.stage.benchmark`) loads the model and the batch and calls it.

Steps (the restriction is built once and the same object handed to every method):

1. After one untimed EAP pass (warm-up), time every method on that batch: ACDC at each tau
   (`Acdc.sweep`, setup timed separately), EAP, EAP-IG, ours (EAP-IG scores, restricted ranking,
   exact bracketed bisection for f >= target, `minimal_faithful_prefix`) and the exhaustive
   reference (`exhaustive_effects`: every restricted edge removed ALONE, everything else intact,
   exact, several edges per batched forward).
2. Evaluate every method exactly on the restricted graph (`mechflow.benchmark.evaluation`,
   "Restricted faithfulness"): faithfulness curve at the MIB budgets, CPR and CMD (`area_metrics`),
   edge ROC AUC against the exhaustive reference (`mechflow.benchmark.roc`).
3. Headline: ACDC time at the matched tau / our discovery time, with the arithmetic, and the
   full graph for every method (`full_graph_table`): EAP, EAP-IG and ours measured over all edges
   in the same run; ACDC and exhaustive patching extrapolated from their restricted times, weighted
   by the measured cost of a forward resumed at each receiver's depth.
4. Write the files (`mechflow.benchmark.report`).

Method scores for curves and ROC: EAP / EAP-IG |score|; the reference |effect|; ACDC (which gives
circuits, not scores) ranks an edge by the number of taus whose circuit keeps it, ties broken by
|D increase| when it was evaluated in the smallest-tau run. ACDC's ROC instead uses its tau sweep's
(FPR, TPR) points plus (0, 0) and (1, 1), area by trapezoid over points sorted by (FPR, TPR).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from mechflow.attribution.patching import PairBatch
from mechflow.benchmark.acdc import Acdc, AcdcRun, depth_weighted_factor, roc_points, stage_costs
from mechflow.benchmark.config import BenchmarkConfig
from mechflow.benchmark.evaluation import (
    RestrictedEvaluator,
    ResumedRestrictedEvaluator,
    exhaustive_effects,
    ranking_inputs,
    reference_positives,
)
from mechflow.benchmark.report import write_outputs
from mechflow.benchmark.restriction import EdgeRestriction
from mechflow.benchmark.roc import roc_auc, step_auc
from mechflow.circuits.eap import edge_scores
from mechflow.circuits.faithfulness import (
    CircuitEvaluator,
    area_metrics,
    faithfulness_curve,
    prefix_mask,
    ranked_edges,
)
from mechflow.circuits.graph import EdgeGraph
from mechflow.circuits.search import minimal_faithful_prefix
from mechflow.contracts.versions import SCHEMA_VERSION
from mechflow.io import canonical_hash

log = logging.getLogger(__name__)


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


def compare_methods(model, batch: PairBatch, bench: BenchmarkConfig, *, table: Path, table_tex: Path,
                    timings: Path, summary: Path, roc: Path, curves: Path, meta: dict | None = None,
                    graph: EdgeGraph | None = None) -> dict:
    """Steps 1-4 on an already-selected batch; returns the ``timings.json`` document.

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
    ig = edge_scores(model, batch, "eap-ig", steps=bench.ig_steps, rule=bench.ig_rule, graph=graph,
                     from_layer=from_layer)
    ig_s = time.perf_counter() - t0
    log.info("EAP %.1fs, EAP-IG (%d steps) %.1fs, backward from layer %d", eap_s, bench.ig_steps, ig_s, from_layer)

    # ours: EAP-IG ranking over the restricted edges + exact bisection (own evaluator, timed)
    t0 = time.perf_counter()
    ours_ev = ResumedRestrictedEvaluator(model, batch, restriction)
    ig_order = restriction.ranked(ig)
    found = minimal_faithful_prefix(ours_ev, ig_order, bench.target, bench.percentages)
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
        ig_full = edge_scores(model, batch, "eap-ig", steps=bench.ig_steps, rule=bench.ig_rule, graph=graph)
        ig_full_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        full_ev = CircuitEvaluator(model, batch, graph)
        full_found = minimal_faithful_prefix(full_ev, ranked_edges(ig_full, graph), bench.target, bench.percentages)
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
    positives = reference_positives(effects, restriction, found.n_edges, bench.reference_threshold,
                                    ev.m_full - ev.m_empty)
    scores = {"eap": restriction.restrict_scores(eap), "eap-ig": restriction.restrict_scores(ig),
              "exhaustive": effects, "acdc": acdc_scores(runs, restriction)}
    curves = {name: faithfulness_curve(ev, restriction.ranked(s.nan_to_num(0.0)), bench.percentages)
              for name, s in scores.items()}
    areas = {name: area_metrics(c) for name, c in curves.items()}
    aucs = {name: roc_auc(*ranking_inputs(s, positives, restriction)) for name, s in scores.items() if name != "acdc"}
    acdc_roc = roc_points(runs, positives, restriction)
    aucs["acdc"] = step_auc([(p["fpr"], p["tpr"]) for p in acdc_roc])

    acdc_f = [ev.faithfulness(run.kept) for run in runs]
    matched, match_rule = _match_tau(runs, acdc_f, found.faithfulness, bench.acdc_match)
    topk = {name: ev.faithfulness(prefix_mask(restriction.ranked(scores[name].nan_to_num(0.0)),
                                              found.n_edges, graph)) for name in ("eap", "exhaustive")}

    n_ig_fwd = 2 + bench.ig_steps
    rows = [
        _row(f"acdc (tau={runs[matched].threshold:g})", acdc_setup + runs[matched].seconds,
             2 + runs[matched].n_forward, 0, runs[matched].n_kept, acdc_f[matched], areas["acdc"], aucs["acdc"]),
        _row("eap", eap_s, 3, 1, found.n_edges, topk["eap"], areas["eap"], aucs["eap"]),
        _row("eap-ig", ig_s, n_ig_fwd, bench.ig_steps, found.n_edges, found.faithfulness, areas["eap-ig"],
             aucs["eap-ig"]),
        _row("ours (eap-ig + search)", ig_s + search_s, n_ig_fwd + search_fwd, bench.ig_steps, found.n_edges,
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
        "config": {"benchmark": bench.to_dict(), "compare": bench.compare_dict()},
        "config_hash": canonical_hash({"benchmark": bench.to_dict(), "compare": bench.compare_dict()}),
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
        "eap_ig": {"seconds": ig_s, "n_forward": n_ig_fwd, "n_backward": bench.ig_steps, "steps": bench.ig_steps,
                   "backward_from_layer": from_layer},
        "ours": {"eap_ig_seconds": ig_s, "search_seconds": search_s, "search_forwards": search_fwd,
                 "n_evaluations": found.n_evaluations, "n_edges": found.n_edges,
                 "faithfulness": found.faithfulness, "faithfulness_one_fewer": found.faithfulness_one_fewer,
                 "target": bench.target, "edges": graph.edge_names(ours_circuit)},
        "exhaustive": {"seconds": ex_s, "n_forward": 2 + ex_fwd, "m_full": m_full_ref,
                       "n_positives": int(positives.sum()),
                       "positives_rule": "top-k |effect|, k = ours" if bench.reference_threshold is None else
                       f"|effect| > {bench.reference_threshold} |m(N) - m(~R)|"},
        "curves": {name: [asdict(p) for p in c] for name, c in curves.items()},
        "areas": areas, "roc_auc": aucs, "headline": headline, "full_graph_extrapolation": extrapolation,
        "full_graph": full_graph,
        "table": rows,
    }
    write_outputs(out, doc, rows, curves, scores, positives, restriction, acdc_roc, aucs)
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

