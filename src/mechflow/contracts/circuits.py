"""``circuit.json``: a circuit with everything needed to recompute its faithfulness from the file.

The file holds the model config, the graph size, the circuit's unit (``"edges"`` or ``"nodes"``),
its edges (with scores; empty for a node circuit) and nodes (with scores for a node circuit),
m(N), m(empty), m(C), f, the target, the token ids of every clean/corrupted prompt, the metric
spec, the search config and its hash. Node and edge names are MIB component names
(`mechflow.contracts.names`). Written by `mechflow.circuits.result.write_circuit`, read by
`read_circuit` (and recomputed from the file alone by `reevaluate_circuit`).

The metric specs build the metric they describe (``spec.build()``: torch is imported then), so a
reader evaluates exactly the metric the file names.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, Field, model_validator

from mechflow.contracts.documents import Document, VersionedDocument


class LogitDiffSpec(Document):
    """metric(logits)[i] = logits[i, position, correct_ids[i]] - logits[i, position, incorrect_ids[i]]."""

    kind: Literal["logit_diff"] = "logit_diff"
    position: int = -1
    correct_ids: list[int]
    incorrect_ids: list[int]

    def build(self):
        import torch  # lazily: the contracts import without torch

        pos = self.position
        correct, incorrect = torch.tensor(self.correct_ids), torch.tensor(self.incorrect_ids)

        def metric(logits):
            rows = torch.arange(logits.shape[0])
            return logits[rows, pos, correct] - logits[rows, pos, incorrect]

        return metric


class TargetMetricSpec(Document):
    """metric(logits)[i] = sum_j sign[i][j] * v[i, position, target_ids[i][j]] with v = logits (``logit``)
    or their softmax (``prob``): the tasks' logit and probability differences (`TaskBatch.metric`)."""

    kind: Literal["targets"] = "targets"
    value: Literal["logit", "prob"]
    position: int = -1
    target_ids: list[list[int]]
    target_signs: list[list[float]]

    @classmethod
    def from_task_batch(cls, batch) -> TargetMetricSpec:
        return cls(value="prob" if batch.metric_kind == "prob_diff" else "logit",
                   target_ids=batch.target_ids.tolist(), target_signs=batch.target_signs.double().tolist())

    def build(self):
        import torch  # lazily: the contracts import without torch

        pos = self.position
        ids, signs = torch.tensor(self.target_ids), torch.tensor(self.target_signs)

        def metric(logits):
            last = logits[:, pos, :]
            values = last.softmax(dim=-1) if self.value == "prob" else last
            return (values.gather(-1, ids) * signs.to(values.dtype)).sum(dim=-1)

        return metric


class PromptSet(Document):
    clean_tokens: list[list[int]]
    corrupted_tokens: list[list[int]]
    prompt_ids: list[str] | None = None
    dataset_sha256: str | None = None


class CircuitEdgeEntry(Document):
    name: str
    score: float


class CircuitNodeEntry(Document):
    name: str
    score: float


class CurvePointEntry(Document):
    """One budget of the faithfulness curve; ``n_units`` counts the circuit's unit (edges or nodes).

    Files written before node circuits existed name it ``n_edges``; both spellings are read.
    """

    percent: float
    n_units: int = Field(validation_alias=AliasChoices("n_units", "n_edges"))
    metric: float
    faithfulness: float

    @property
    def n_edges(self) -> int:
        """Alias of ``n_units`` (the count is of edges in an edge circuit)."""
        return self.n_units


class CircuitFile(VersionedDocument):
    """``circuit.json`` of the circuit rule (``results/{run}/circuits/{task}/``).

    ``unit`` says what the circuit is made of. Edge circuits: ``edges`` (best first, with scores),
    ``nodes`` the nodes they touch, ``n_edges`` / ``n_edges_total`` their counts. Node circuits:
    ``edges`` empty, ``nodes`` the circuit's nodes best first (scores in ``node_scores``),
    ``n_edges`` / ``n_edges_total`` null. ``n_units`` / ``n_units_total`` count the unit either
    way, and the curve's budgets are percentages of ``n_units_total``.
    """

    model: dict
    n_layers: int
    n_heads: int
    unit: Literal["edges", "nodes"] = "edges"
    n_units_total: int | None = None
    n_units: int | None = None
    n_edges_total: int | None
    level: Literal["edge", "node"] = "edge"
    method: str
    config: dict
    config_hash: str
    target: float
    edges: list[CircuitEdgeEntry]
    nodes: list[str]
    node_scores: list[CircuitNodeEntry] = []
    n_edges: int | None
    m_full: float
    m_empty: float
    m_circuit: float
    faithfulness: float
    faithfulness_one_fewer: float
    sufficiency: float
    comprehensiveness: float
    f1: float
    curve: list[CurvePointEntry]
    cpr: float
    cmd: float
    n_evaluations: int
    metric: Annotated[LogitDiffSpec | TargetMetricSpec, Field(discriminator="kind")]
    prompts: PromptSet

    @model_validator(mode="after")
    def _consistent_unit(self) -> CircuitFile:
        if self.unit == "edges":
            if self.n_edges is None or self.n_edges_total is None:
                raise ValueError("an edge circuit needs n_edges and n_edges_total")
            self.n_units = self.n_edges if self.n_units is None else self.n_units
            self.n_units_total = self.n_edges_total if self.n_units_total is None else self.n_units_total
            if (self.n_units, self.n_units_total) != (self.n_edges, self.n_edges_total):
                raise ValueError("an edge circuit's n_units/n_units_total must equal n_edges/n_edges_total")
        else:
            if self.edges or self.n_edges is not None or self.n_edges_total is not None:
                raise ValueError("a node circuit lists no edges (edges: [], n_edges and n_edges_total null)")
            if self.n_units is None or self.n_units_total is None or self.n_units != len(self.nodes):
                raise ValueError("a node circuit needs n_units == len(nodes) and n_units_total")
        if self.level != self.unit[:-1]:
            raise ValueError(f"level {self.level!r} contradicts unit {self.unit!r}")
        return self
