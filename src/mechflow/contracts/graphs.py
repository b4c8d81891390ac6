"""Files of the `attribution_graph` stage (``results/<run>/graphs/<task>/``).

``<slug>.json`` is the graph in the schema the Neuronpedia / circuit-tracer frontend reads. The
models below mirror circuit-tracer's `circuit_tracer/frontend/graph_models.py` (upstream
safety-research/circuit-tracer at 196e2ce: ``Metadata``, ``QParams``, ``Node``, ``Link``,
``Model``) field for field, with its spellings: node ids ``{layer}_{feature}_{pos}`` (features),
``{layer}_-1_{pos}`` (error nodes), ``E_{token_id}_{pos}`` (embeddings),
``{n_layers + 1}_{token_id}_{pos}`` (logits); feature types ``"cross layer transcoder"`` (the
frontend's name for every transcoder feature), ``"mlp reconstruction error"``, ``"embedding"``,
``"logit"``; a logit's ``clerp`` is ``Output "<token>" (p=0.123)``, which the frontend parses for
the probability. Unlike circuit-tracer's ``Model.links: list[dict]``, links are typed.
``graph-metadata.json`` is the index the frontend lists graphs from (``{"graphs": [Metadata]}``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from mechflow.contracts.documents import Document

FeatureType = Literal["cross layer transcoder", "mlp reconstruction error", "embedding", "logit"]


class GraphMetadata(Document):
    slug: str
    scan: str = Field(description="the transcoder set's name (circuit-tracer: a preset scan or custom-<hash>)")
    transcoder_list: list[str]
    prompt_tokens: list[str] = Field(description="each token decoded alone; \\n, \\t, \\r shown as ⏎ → ↵")
    prompt: str
    node_threshold: float | None = None
    schema_version: int | None = 1


class QParams(Document):
    pinnedIds: list[str]
    supernodes: list[list[str]] = Field(description="each: [label, node_id, node_id, ...]")
    linkType: str
    clickedId: str
    sg_pos: str


class GraphNode(Document):
    node_id: str
    feature: int = Field(description="features: cantor pairing of (layer, feature); errors -1; embeddings the "
                                     "position; logits the token id")
    layer: str = Field(description="the layer; 'E' for embeddings; n_layers + 1 for logits")
    ctx_idx: int
    feature_type: FeatureType
    token_prob: float = 0.0
    is_target_logit: bool = False
    run_idx: int = 0
    reverse_ctx_idx: int = 0
    jsNodeId: str
    clerp: str = ""
    influence: float | None = Field(None, description="cumulative influence score from pruning")
    activation: float | None = None


class GraphLink(Document):
    source: str
    target: str
    weight: float = Field(description="direct effect of source on target (adjacency[target, source])")


class NeuronpediaGraph(Document):
    metadata: GraphMetadata
    qParams: QParams
    nodes: list[GraphNode]
    links: list[GraphLink]


class GraphMetadataIndex(Document):
    graphs: list[GraphMetadata]


class SupernodesDocument(Document):
    """``graphs/<task>/p<N>/supernodes.json``: editable groups of kept features (same position,
    decoder cosine >= ``min_cosine``), each ``[label, node_id, ...]`` as ``qParams.supernodes``."""

    slug: str
    min_cosine: float
    supernodes: list[list[str]]


class GraphLogit(Document):
    token: str
    token_id: int
    probability: float


class PrunedCounts(Document):
    n_nodes: int
    n_feature_nodes: int
    n_edges: int
    node_threshold: float
    edge_threshold: float


class GraphScores(Document):
    replacement: float = Field(description="unpruned graph (circuit-tracer's compute_graph_scores)")
    completeness: float
    replacement_pruned: float = Field(description="pruned nodes' and edges' entries set to zero")
    completeness_pruned: float


class GraphSummary(Document):
    """``graphs/<task>/p<N>/graph.json``: written by ``attribution_graph``."""

    stage: Literal["attribution_graph"]
    task: str
    prompt_index: int
    slug: str
    prompt: str
    tokens: list[str]
    answer: str
    foil: str
    answer_id: int
    foil_id: int
    logits: list[GraphLogit]
    n_active_features: int
    n_feature_nodes: int = Field(description="features with computed rows (the budget's choice by influence)")
    n_error_nodes: int
    n_token_nodes: int
    n_logit_nodes: int
    n_edges: int = Field(description="non-zero entries of the unpruned adjacency")
    pruned: PrunedCounts
    scores: GraphScores
    error_share_per_layer: list[float] = Field(description="each layer's error nodes' share of influence")
    top_paths: list[list[str]]
    validation: dict[str, Any] = Field(description="summary of validate_graph (correlations, sign agreement)")
    bos_zeroed: bool
    seconds: dict[str, float]
    config: dict[str, Any]
    files: dict[str, str]
