"""Typed config of the attribution-graph stage (`config/graph/*.yaml`, rules `attribution_graph`
and `graphs_summary`). `workflow/schemas/config/graph.schema.json` is generated from it
(`python -m mechflow.contracts.export`); a unit test fails when they drift.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, StrictBool, StrictInt, StrictStr

from mechflow.config import GroupConfig, config_model

Operation = Literal["zero", "x2", "x-1", "x1.1", "x0.9"]


@config_model("graph")
class GraphConfig(GroupConfig):
    """Attribution graphs of task prompts (see `mechflow.graphs.stage`)."""

    SELECTION_KEYS: ClassVar[tuple[str, ...]] = ("enabled", "tasks", "prompts")  # which jobs exist

    enabled: StrictBool = Field(False, description="build graphs in this run (opt in: the transcoder set "
                                "trains one transcoder per layer)")
    tasks: tuple[StrictStr, ...] = Field(("ioi", "factual_recall"), description="tasks whose prompts get graphs; "
                                         "each must be selected in `task`")
    prompts: tuple[StrictInt, ...] = Field((0, 1), description="row indices of each task's dataset.jsonl")
    max_tokens: StrictInt = Field(64, ge=1, description="longest prompt accepted (tokens, BOS included)")
    max_n_logits: StrictInt = Field(10, ge=1, description="most logit nodes (circuit-tracer's max_n_logits)")
    desired_logit_prob: float = Field(0.95, gt=0, le=1, description="logit nodes: smallest top set with this "
                                      "cumulative probability")
    include_answer_logits: StrictBool = Field(True, description="add the task's answer and foil tokens to the "
                                              "logit nodes when the top set misses them")
    max_feature_nodes: StrictInt | None = Field(4096, ge=1, description="feature budget: rows computed for the "
                                                "most influential features (null: every active feature)")
    batch_size: StrictInt = Field(64, ge=1, description="adjacency rows per backward pass")
    update_interval: StrictInt = Field(4, ge=1, description="batches between re-rankings of features by influence")
    zero_bos: StrictBool = Field(True, description="a leading BOS has no feature or error nodes (circuit-tracer)")
    node_threshold: float = Field(0.8, gt=0, le=1, description="pruning: keep the nodes carrying this share of "
                                  "influence on the logits")
    edge_threshold: float = Field(0.98, gt=0, le=1, description="pruning: keep the edges carrying this share")
    supernode_min_cosine: float = Field(0.7, ge=-1, le=1, description="supernodes: same-position features whose "
                                        "decoder cosine is at least this")
    validation_features: StrictInt = Field(10, ge=0, description="top features by influence on the answer logit "
                                           "intervened on in the real model (0: no validation)")
    validation_operations: tuple[Operation, ...] = Field(
        ("zero", "x2", "x-1", "x1.1", "x0.9"), min_length=1,
        description="zero: a -> 0; x2: a -> 2a; x-1: a -> -a; x1.1 / x0.9: a -> 1.1a / 0.9a (small: the linear regime)")
    validation_exclude_positions: tuple[StrictInt, ...] = Field(
        (1,), description="a second validation set: the top features outside these prompt positions (default: "
        "the first token after BOS, SmolLM2's attention sink / massive-activation position); []: no second set")
    viewer_top_contexts: StrictInt = Field(5, ge=0, description="top activating corpus contexts shown per feature "
                                           "(from rule transcoder_features, which keeps features.top_contexts; "
                                           "0: none)")
    viewer_window: StrictInt = Field(8, ge=0, description="tokens shown each side of the activating token")
    viewer_logit_effects: StrictInt = Field(5, ge=1, description="top promoted / suppressed tokens per feature")
