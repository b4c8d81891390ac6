"""Reference files: the footer document of ``edge_reference.parquet`` and ``auc.json``.

The table of ``edge_reference.parquet`` is `mechflow.contracts.parquet.EDGE_REFERENCE_SCHEMA`.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from mechflow.contracts.documents import Document, VersionedDocument

EDGE_REFERENCE_META_KEY = b"mechflow.edge_reference"  # footer key of the EdgeReferenceDocument


class EdgeStratum(Document):
    layer: int = Field(description="receiver layer (logits: n_layers)")
    n_edges: int = Field(description="edges of the full graph in the stratum")
    n_sampled: int
    weight: float | None = Field(description="n_edges / n_sampled (null: nothing sampled)")


class EdgeSampling(Document):
    rule: str
    seed: int
    n_requested: int
    min_per_layer: int
    strata: list[EdgeStratum]


class LayerTiming(Document):
    layer: int
    n_edges: int
    seconds: float
    n_forward: int


class EdgeReferenceDocument(VersionedDocument):
    """Footer document of ``edge_reference.parquet`` (under ``EDGE_REFERENCE_META_KEY``).

    A model on which edges are undefined gets an empty table and ``skipped`` (the reason); the
    run fields are then absent.
    """

    model: str | None
    task: str
    config: dict[str, Any] = Field(description="the reference settings the effects depend on")
    config_hash: str
    skipped: str | None = Field(description="why no edge was evaluated (null: evaluated)")
    n_prompts: int | None = None
    n_pos: int | None = None
    prompt_ids: list[str] | None = None
    prompts_hash: str | None = None
    m_full: float | None = None
    m_empty: float | None = None
    n_edges_full: int | None = None
    n_edges_restricted: int | None = None
    n_edges_sampled: int | None = None
    n_edges_evaluated: int | None = None
    sampling: EdgeSampling | None = None
    seconds: float | None = None
    n_forward: int | None = None
    per_layer: list[LayerTiming] | None = None
    effect: str | None = Field(None, description="what exact_effect measures")


class Positives(Document):
    """One positives definition over an item set (labels are not stored)."""

    k: int | None = None
    cutoff: float | None = None
    n_positives: int
    rule: str


class MethodReport(Document):
    roc_auc: dict[str, float | None] = Field(description="positives variant -> ROC AUC of |score| (null: undefined)")
    pearson: float | None
    spearman: float | None
    spearman_abs: float | None


class NodeSection(Document):
    source: str = Field(description="the node_scores.parquet read")
    n_components: int
    n_prompts: int
    scale_m_clean_minus_m_corrupted: float
    positives: dict[str, Positives]
    methods: dict[str, MethodReport]


class EdgeSet(Document):
    description: str
    n_edges: int
    positives: dict[str, Positives]
    methods: dict[str, MethodReport]


class EdgeSection(Document):
    skipped: str | None
    edge_reference: EdgeReferenceDocument = Field(description="the edge reference's footer (without prompt_ids)")
    scale_m_full_minus_m_empty: float | None = None
    scores_source: dict[str, str] | None = None
    sets: dict[str, EdgeSet] | None = None


class PositivesDefinition(Document):
    top_k: str
    threshold: str
    scores: str


class AucDocument(VersionedDocument):
    """``auc.json`` of the ``reference`` rule: every method vs exact patching, nodes and edges."""

    model: str | None
    task: str
    config: dict[str, Any]
    config_hash: str
    positives_definition: PositivesDefinition
    nodes: NodeSection
    edges: EdgeSection
    hash: str = Field(description="canonical hash of the document without this key")
