"""Circuits on the MIB graph: EAP / EAP-IG scores, exact circuit evaluation, minimal faithful
circuits, faithfulness curves (CPR/CMD) and ``circuit.json``; edge circuits where edge patching is
defined, node circuits (input, heads, MLPs) everywhere, including Gemma-3."""

from mechflow.circuits.config import CircuitConfig, Target, check_target, checked
from mechflow.circuits.core import discover_circuit, edges_undefined, resolve_unit
from mechflow.circuits.eap import edge_scores
from mechflow.circuits.faithfulness import (
    MIB_PERCENTAGES,
    CircuitEvaluator,
    area_metrics,
    faithfulness_curve,
    normalized_faithfulness,
    prefix_mask,
    ranked_edges,
    reads_last_position_only,
    sufficiency_comprehensiveness,
)
from mechflow.circuits.forward import (
    check_edge_model,
    edge_model_problems,
    graph_forward,
)
from mechflow.circuits.graph import EdgeGraph
from mechflow.circuits.nodes import NodeEvaluator, node_scores, ranked_nodes
from mechflow.circuits.result import (
    CircuitFile,
    LogitDiffSpec,
    PromptSet,
    read_circuit,
    reevaluate_circuit,
    tl_edge_patched_logits,
    tl_node_patched_logits,
    write_circuit,
)
from mechflow.circuits.search import SearchResult, minimal_faithful_prefix

__all__ = [
    "MIB_PERCENTAGES", "CircuitConfig", "CircuitEvaluator", "CircuitFile", "EdgeGraph", "LogitDiffSpec",
    "NodeEvaluator", "PromptSet", "SearchResult", "Target", "area_metrics", "check_edge_model", "check_target",
    "checked", "discover_circuit", "edge_model_problems", "edge_scores", "edges_undefined", "faithfulness_curve",
    "graph_forward", "minimal_faithful_prefix", "node_scores", "normalized_faithfulness", "prefix_mask", "ranked_edges",
    "ranked_nodes", "read_circuit", "reads_last_position_only", "reevaluate_circuit", "resolve_unit",
    "sufficiency_comprehensiveness", "tl_edge_patched_logits", "tl_node_patched_logits", "write_circuit",
]
