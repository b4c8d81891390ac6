"""Find, evaluate and describe a minimal faithful circuit (the circuits stage's computation).

Steps:
1. Resolve the unit (`resolve_unit`): edges of the MIB graph where edge patching is defined,
   else nodes (input, heads, MLPs; `mechflow.circuits.nodes`), or as configured.
2. Score every unit with EAP or EAP-IG (`mechflow.circuits.eap` / `nodes.node_scores`).
3. Rank units (|score| by default) and evaluate the faithfulness curve exactly (CPR, CMD).
4. Bracketed bisection for the smallest faithful prefix (`mechflow.circuits.search`).
5. Exact sufficiency / comprehensiveness of that circuit; assemble a `CircuitFile`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from mechflow.attribution.patching import PairBatch
from mechflow.circuits.config import CircuitConfig, checked
from mechflow.circuits.eap import edge_scores
from mechflow.circuits.faithfulness import (
    CircuitEvaluator,
    area_metrics,
    prefix_mask,
    ranked_edges,
    sufficiency_comprehensiveness,
)
from mechflow.circuits.forward import check_edge_model
from mechflow.circuits.graph import EdgeGraph
from mechflow.circuits.nodes import NodeEvaluator, node_scores, ranked_nodes
from mechflow.circuits.result import (
    CircuitFile,
    LogitDiffSpec,
    PromptSet,
    TargetMetricSpec,
)
from mechflow.circuits.search import SearchResult, minimal_faithful_prefix
from mechflow.errors import ConfigError
from mechflow.models.config import ModelConfig

log = logging.getLogger(__name__)


def edges_undefined(model_cfg: ModelConfig | Mapping[str, Any], model=None, *,
                    instead: str = "circuits") -> str | None:
    """Why edge-level circuits are not defined for the model, or None when they are: the one test,
    shared by `resolve_unit` and the reference stage. ``model.edge_circuits: false`` decides without
    the model; otherwise `check_edge_model` (when `model` is given). `instead` names what the
    caller falls back to ("circuits", "reference")."""
    mcfg = ModelConfig.from_dict(model_cfg)
    if not mcfg.edge_circuits:
        return (f"model.edge_circuits is false for {mcfg.name!r} (config/model/*.yaml): "
                f"edge-level circuits are not defined for it; node-level {instead} only")
    if model is not None:
        try:
            check_edge_model(model)
        except ConfigError as e:
            return str(e)
    return None


def resolve_unit(unit: str, model, model_cfg: ModelConfig | Mapping[str, Any]) -> str:
    """``"edges"`` or ``"nodes"``: ``"auto"`` is edges iff `edges_undefined` finds no reason
    (``model.edge_circuits`` and the model's architecture); ``"edges"`` where they are undefined is
    a ConfigError naming ``circuits.unit``."""
    unit = checked("unit", unit)
    if unit == "nodes":
        return "nodes"
    reason = edges_undefined(model_cfg, model)
    if unit == "edges" and reason is not None:
        raise ConfigError(f"circuits.unit: 'edges', but {reason}. Set circuits.unit: nodes or auto.")
    return "nodes" if reason is not None else "edges"


def discover_circuit(
    model,
    batch: PairBatch,
    cfg: CircuitConfig,
    *,
    model_cfg: dict,
    metric_spec: LogitDiffSpec | TargetMetricSpec,
    prompt_ids: list[str] | None = None,
    dataset_sha256: str | None = None,
    progress: bool = False,
) -> tuple[CircuitFile, Tensor]:
    """Run steps 1-5; returns the circuit document and the full scores: ``[n_senders, n_receivers]``
    for an edge circuit, ``[n_senders]`` (one per node) for a node circuit (``doc.unit``).

    ``metric_spec`` must describe ``batch.metric`` (it is what an independent re-evaluator rebuilds).
    """
    unit = resolve_unit(cfg.unit, model, model_cfg)
    graph = EdgeGraph.from_cfg(model.cfg)
    if unit == "edges":
        scores = edge_scores(model, batch, cfg.method, cfg.ig_steps, cfg.ig_rule, graph=graph, progress=progress)
        order = ranked_edges(scores, graph, absolute=cfg.absolute)
        ev = CircuitEvaluator(model, batch, graph)
    else:
        scores = node_scores(model, batch, cfg.method, cfg.ig_steps, cfg.ig_rule, graph=graph, progress=progress)
        order = ranked_nodes(scores, absolute=cfg.absolute)
        ev = NodeEvaluator(model, batch, graph)
    found = minimal_faithful_prefix(ev, order, cfg.target, cfg.percentages)
    kept = ev.prefix(order, found.n_edges)
    sc = sufficiency_comprehensiveness(ev, kept)
    areas = area_metrics(found.curve)
    top = order[:found.n_edges].tolist()
    if unit == "edges":
        parts = {"edges": [{"name": graph.edge_name(i // graph.n_receivers, i % graph.n_receivers),
                            "score": float(scores.flatten()[i])} for i in top],
                 "nodes": graph.nodes_of(prefix_mask(order, found.n_edges, graph)),
                 "n_edges": found.n_edges, "n_edges_total": graph.n_edges}
    else:
        names = graph.sender_names
        parts = {"edges": [], "nodes": [names[i] for i in top],
                 "node_scores": [{"name": names[i], "score": float(scores[i])} for i in top],
                 "n_edges": None, "n_edges_total": None}
    doc = CircuitFile(
        model=model_cfg, n_layers=graph.n_layers, n_heads=graph.n_heads, unit=unit, level=unit[:-1],
        n_units=found.n_edges, n_units_total=ev.n_units,
        method=cfg.method, config=cfg.to_dict(), config_hash=cfg.hash(), target=cfg.target, **parts,
        m_full=ev.m_full, m_empty=ev.m_empty, m_circuit=found.metric, faithfulness=found.faithfulness,
        faithfulness_one_fewer=found.faithfulness_one_fewer, **sc,
        curve=[vars(p) for p in found.curve], cpr=areas["cpr"], cmd=areas["cmd"],
        n_evaluations=ev.n_evaluations, metric=metric_spec,
        prompts=PromptSet(clean_tokens=batch.clean_tokens.tolist(),
                          corrupted_tokens=batch.corrupted_tokens.tolist(),
                          prompt_ids=prompt_ids, dataset_sha256=dataset_sha256),
    )
    _log(found, ev.n_units, unit, areas)
    return doc, scores


def _log(found: SearchResult, total: int, unit: str, areas: dict[str, float]) -> None:
    log.info("circuit: %d/%d %s, f=%.3f, CPR=%.3f, CMD=%.3f", found.n_edges, total, unit,
             found.faithfulness, areas["cpr"], areas["cmd"])
