"""Files of the `steer` stage (``results/<run>/steer/<task>/``): ``interventions.jsonl`` (one
`InterventionRecord` per line: one intervention at one strength), ``activations.jsonl`` (one
`ActivationRecord` per line: a steered feature's activation at one token of one prompt) and
``summary.json`` (`SteerSummary`). Both JSONL layouts are meant for comparing interventions across
tools: every field is documented here and in ``workflow/schemas/contracts/``, and
``polars.read_ndjson`` reads both.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mechflow.contracts.documents import Document, VersionedDocument

Kind = Literal["contrast", "probe", "random", "shuffled", "sae_feature", "transcoder_feature"]


class InterventionSpec(Document):
    """What was done to the forward pass."""

    kind: Kind = Field(description="contrast: difference-of-means direction; random / shuffled: its controls; "
                       "sae_feature / transcoder_feature: a dictionary latent clamped through its dictionary")
    id: str = Field(description="e.g. contrast:L12, sae:1234, random:L12:7")
    hook: str = Field(description="TransformerLens hook whose output is edited")
    positions: Literal["last", "all"] = Field(description="last: the final position of each forward pass; all: "
                                              "every position after BOS")
    operation: Literal["add", "scale", "set"] = Field(description="add: x + alpha v; scale: a -> alpha a; "
                                                      "set: a -> alpha")
    alpha: float = Field(description="the strength: multiplier of the direction, of the activation, or the value")
    strength: float = Field(description="distance from no intervention: |alpha| (add, set), |alpha - 1| (scale)")
    layer: int | None = Field(description="residual layer of a direction; the dictionary's layer of a feature")
    norm: float | None = Field(description="L2 norm of the direction (add only)")
    dictionary: str | None = Field(description="dictionary folder of a feature")
    dictionary_kind: Literal["sae", "transcoder"] | None
    feature: int | None = Field(description="latent index in the dictionary")
    error_term: bool | None = Field(description="feature clamps: the dictionary's reconstruction error was kept")


class PromptSetSpec(Document):
    """Which prompts: a task's held-out clean (positive) or corrupted (negative) prompts."""

    task: str
    role: Literal["positive", "negative"]
    dataset: str = Field(description="the task's dataset.jsonl")
    dataset_sha256: str
    ids: list[int | str] = Field(description="example ids, in the order of the per-prompt lists")


class TargetEffect(Document):
    """The task metric on the held-out positive prompts, unsteered and steered."""

    metric: Literal["logit_diff", "prob_diff"]
    prompts: PromptSetSpec
    before: list[float]
    after: list[float]
    before_mean: float
    after_mean: float
    effect: float = Field(description="mean(after - before)")
    gap: float = Field(description="mean metric of held-out positives - of held-out negatives, unsteered")
    normalized_effect: float | None = Field(description="effect / gap")
    accuracy_before: float = Field(description="share of prompts with metric > 0, unsteered")
    accuracy_after: float
    flip_rate: float = Field(description="share of prompts whose answer (sign of the metric) changed")


class NegativeSide(Document):
    prompts: PromptSetSpec
    kl: list[float] = Field(description="per prompt: KL(unsteered || steered) of the final next-token distribution")
    kl_mean: float
    metric_before_mean: float
    metric_after_mean: float


class CorpusSide(Document):
    tokens: str = Field(description="the corpus tokens.parquet")
    tokens_sha256: str
    n_contexts: int
    n_predictions: int
    ce_before: float = Field(description="next-token CE (nats/token), unsteered")
    ce_after: float = Field(description="next-token CE with the intervention at every position")
    ce_increase: float
    kl: float = Field(description="mean KL(unsteered || steered) per prediction")


class OtherTaskSide(Document):
    task: str
    dataset_sha256: str
    n_prompts: int
    metric_before_mean: float
    metric_after_mean: float
    change: float
    normalized_change: float | None = Field(description="change / (the task's clean - corrupted mean gap)")


class SideEffectsBlock(Document):
    negative: NegativeSide
    corpus: CorpusSide | None
    other_tasks: list[OtherTaskSide]


class InterventionRecord(VersionedDocument):
    """One intervention at one strength, its effect per prompt and its side effects (a line of
    interventions.jsonl)."""

    run: str
    model: str
    task: str
    config_hash: str = Field(description="sha256 of the steer config (canonical JSON)")
    intervention: InterventionSpec
    target: TargetEffect
    side_effects: SideEffectsBlock | None = Field(description="null for controls (random / shuffled directions), "
                                                  "which are measured on the target only")
    reached_target: bool
    within_bounds: bool | None
    failed_bounds: list[str]
    chosen: bool = Field(description="the strength the stage picked for this intervention")


class ActivationRecord(VersionedDocument):
    """A steered feature's activation at one token of one prompt, unsteered (a line of activations.jsonl)."""

    run: str
    model: str
    task: str
    dictionary: str
    dictionary_kind: Literal["sae", "transcoder"]
    hook: str
    feature: int
    role: Literal["positive", "negative"]
    dataset_sha256: str
    prompt_id: int | str
    position: int
    token_id: int
    token: str
    activation: float


class LayerRow(Document):
    layer: int
    hook: str
    norm: float = Field(description="L2 norm of the contrast direction")
    auc: float = Field(description="held-out AUC of the projection on the direction (positives above negatives)")
    separation: float | None = Field(description="held-out (mean_pos - mean_neg) / pooled std of the projection; "
                                     "null: infinite (the classes differ and neither varies)")
    probe_train_accuracy: float
    probe_accuracy: float = Field(description="held-out accuracy of the logistic-regression probe")
    probe_cosine: float = Field(description="cosine of the probe weight (activation space) with the direction")


class InterventionSummary(Document):
    kind: Kind
    id: str
    hook: str
    operation: Literal["add", "scale", "set"]
    alphas: list[float]
    normalized_effects: list[float | None]
    chosen_alpha: float | None
    why: str = Field(description="why this strength, or why none was chosen")
    meta: dict = Field(description="how the intervention was picked (e.g. a feature's attribution)")


class Controls(Document):
    alpha: float = Field(description="strength of the comparison: the chosen one, else the weakest that reaches "
                         "the target (side effects aside), else the one of most extreme effect")
    effect: float | None = Field(description="normalised effect of the contrast direction at alpha")
    random_effects: list[float | None]
    random_percentile: float | None = Field(description="% of random directions with a less extreme effect")
    beats_random: bool
    shuffled_effect: float | None
    shuffled_norm: float = Field(description="norm of the shuffled-label direction before rescaling to the "
                                 "contrast direction's norm")


class SteerSummary(VersionedDocument):
    """Per task: the layer scan, every intervention's sweep and choice, the controls and the files."""

    stage: Literal["steer"]
    run: str
    model: str
    task: str
    config: dict
    config_hash: str
    dataset: str
    dataset_sha256: str
    direction_source: str = Field(description="the task's clean / corrupted prompts, or the contrast file")
    n_train: int
    n_heldout: int
    position: Literal["last", "mean"]
    layers: list[LayerRow]
    chosen_layer: int
    gap: float = Field(description="held-out positive - negative mean metric, unsteered")
    interventions: list[InterventionSummary]
    controls: Controls | None
    n_records: int
    n_activation_records: int
    moved: list[str] = Field(description="interventions whose chosen strength (else the weakest reaching the "
                             "target, else the strongest) lowered (target < 0) or raised held-out accuracy")
    notes: list[str] = Field(description="what the stage skipped, and why")
