"""Edge-level circuits on the MIB graph: EAP / EAP-IG scores, exact circuit evaluation,
minimal faithful circuits, faithfulness curves (CPR/CMD) and ``circuit.json``."""

from mechflow.circuits.config import CircuitConfig
from mechflow.circuits.core import discover_circuit
from mechflow.circuits.eap import edge_scores
from mechflow.circuits.faithfulness import (
    MIB_PERCENTAGES,
    CircuitEvaluator,
    area_metrics,
    faithfulness_curve,
    normalized_faithfulness,
    prefix_mask,
    ranked_edges,
    sufficiency_comprehensiveness,
)
from mechflow.circuits.forward import check_edge_model, graph_forward
from mechflow.circuits.graph import EdgeGraph
from mechflow.circuits.result import (
    CircuitFile,
    LogitDiffSpec,
    PromptSet,
    read_circuit,
    reevaluate_circuit,
    tl_edge_patched_logits,
    write_circuit,
)
from mechflow.circuits.search import SearchResult, check_target, minimal_faithful_prefix

__all__ = [
    "MIB_PERCENTAGES", "CircuitConfig", "CircuitEvaluator", "CircuitFile", "EdgeGraph", "LogitDiffSpec",
    "PromptSet", "SearchResult", "area_metrics", "check_edge_model", "check_target", "discover_circuit",
    "edge_scores", "faithfulness_curve", "graph_forward", "minimal_faithful_prefix", "normalized_faithfulness",
    "prefix_mask", "ranked_edges", "read_circuit", "reevaluate_circuit", "sufficiency_comprehensiveness",
    "tl_edge_patched_logits", "write_circuit",
]
