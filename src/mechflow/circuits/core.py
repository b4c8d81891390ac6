"""Find, evaluate and describe a minimal faithful circuit (the circuits stage's computation).

Steps:
1. Score every edge of the MIB graph with EAP or EAP-IG (`mechflow.circuits.eap`).
2. Rank edges (|score| by default) and evaluate the faithfulness curve exactly (CPR, CMD).
3. Bracketed bisection for the smallest faithful prefix (`mechflow.circuits.search`).
4. Exact sufficiency / comprehensiveness of that circuit; assemble a `CircuitFile`.
"""

from __future__ import annotations

import logging

from torch import Tensor

from mechflow.attribution.patching import PairBatch
from mechflow.circuits.config import CircuitConfig
from mechflow.circuits.eap import edge_scores
from mechflow.circuits.faithfulness import (
    CircuitEvaluator,
    area_metrics,
    prefix_mask,
    ranked_edges,
    sufficiency_comprehensiveness,
)
from mechflow.circuits.graph import EdgeGraph
from mechflow.circuits.result import CircuitFile, LogitDiffSpec, PromptSet
from mechflow.circuits.search import minimal_faithful_prefix

log = logging.getLogger(__name__)


def discover_circuit(
    model,
    batch: PairBatch,
    cfg: CircuitConfig,
    *,
    model_cfg: dict,
    metric_spec: LogitDiffSpec,
    prompt_ids: list[str] | None = None,
    dataset_sha256: str | None = None,
    progress: bool = False,
) -> tuple[CircuitFile, Tensor]:
    """Run steps 1-4; returns the circuit document and the full ``[n_senders, n_receivers]`` scores.

    ``metric_spec`` must describe ``batch.metric`` (it is what an independent re-evaluator rebuilds).
    """
    graph = EdgeGraph.from_cfg(model.cfg)
    scores = edge_scores(model, batch, cfg.method, cfg.ig_steps, cfg.ig_rule, graph=graph, progress=progress)
    order = ranked_edges(scores, graph, absolute=cfg.absolute)
    ev = CircuitEvaluator(model, batch, graph)
    found = minimal_faithful_prefix(ev, order, cfg.target, cfg.percentages)
    kept = prefix_mask(order, found.n_edges, graph)
    sc = sufficiency_comprehensiveness(ev, kept)
    areas = area_metrics(found.curve)
    top = order[:found.n_edges]
    edges = [{"name": graph.edge_name(int(i) // graph.n_receivers, int(i) % graph.n_receivers),
              "score": float(scores.flatten()[i])} for i in top]
    doc = CircuitFile(
        model=model_cfg, n_layers=graph.n_layers, n_heads=graph.n_heads, n_edges_total=graph.n_edges,
        method=cfg.method, config=cfg.to_dict(), config_hash=cfg.hash(), target=cfg.target,
        edges=edges, nodes=graph.nodes_of(kept), n_edges=found.n_edges,
        m_full=ev.m_full, m_empty=ev.m_empty, m_circuit=found.metric, faithfulness=found.faithfulness,
        faithfulness_one_fewer=found.faithfulness_one_fewer, **sc,
        curve=[vars(p) for p in found.curve], cpr=areas["cpr"], cmd=areas["cmd"],
        n_evaluations=ev.n_evaluations, metric=metric_spec,
        prompts=PromptSet(clean_tokens=batch.clean_tokens.tolist(),
                          corrupted_tokens=batch.corrupted_tokens.tolist(),
                          prompt_ids=prompt_ids, dataset_sha256=dataset_sha256),
    )
    log.info("circuit: %d/%d edges, f=%.3f, CPR=%.3f, CMD=%.3f", found.n_edges, graph.n_edges,
             found.faithfulness, areas["cpr"], areas["cmd"])
    return doc, scores
