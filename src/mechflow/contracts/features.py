"""Files of the `features` stage (``results/<run>/features/``): ``features.jsonl`` (one
`FeatureRecord` per line) and ``summary.json`` (`FeatureSummary`). Its table,
``task_attribution.parquet``, is `mechflow.contracts.parquet.TASK_ATTRIBUTION_SCHEMA`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from mechflow.contracts.documents import Document

# ----------------------------------------------------------------------------- features.jsonl


class ActivationHistogram(Document):
    """Counts of log10(activation) of the latent's non-zero activations on a grid shared by every
    latent; values outside the range fall into the first / last bin."""

    log10_lo: float
    log10_hi: float
    bins_per_decade: int
    counts: list[int]


class LatentStats(Document):
    """The latent over every streamed harvest row (mean and std over the rows where it fires)."""

    n_tokens: int = Field(description="harvest rows streamed")
    n_active: int = Field(description="rows where the latent is non-zero")
    frequency: float = Field(description="n_active / n_tokens")
    mean_active: float
    std_active: float
    max: float
    hist: ActivationHistogram


class TopContext(Document):
    """One top-activating context: the token the latent fires on and `window` tokens each side."""

    rank: int = Field(description="0 = the highest activation")
    activation: float
    context_id: int = Field(description="row of the corpus tokens.parquet")
    position: int = Field(description="token position in the context")
    token_id: int
    token: str = Field(description="the token's text (decoded alone)")
    left: list[str]
    right: list[str]
    left_ids: list[int]
    right_ids: list[int]


class LogitEffect(Document):
    token_id: int
    token: str
    value: float = Field(description="direct logit effect per unit activation (W_dec W_U through the final norm)")


class LogitEffects(Document):
    promoted: list[LogitEffect] = Field(description="top n_logits tokens, largest effect first")
    suppressed: list[LogitEffect] = Field(description="bottom n_logits tokens, most negative first")


class LatentTaskAttribution(Document):
    attribution: float = Field(description="mean over prompts of (a_clean - a_target) . dm/da, summed over positions")
    rank: int = Field(description="rank by |attribution| among all latents (1 = largest)")
    verified: bool = Field(description="checked by exact ablation (one of the top n_verify)")
    exact_effect: float | None = Field(description="m(spliced) - m(latent patched); null if not verified")


class FeatureRecord(Document):
    """One line of ``features.jsonl``: what one SAE latent reads, writes and does for the tasks."""

    feature: int = Field(description="latent index")
    hook: str
    layer: int | None
    model: str
    architecture: str
    dictionary: str = Field(description="the SAELens folder")
    stats: LatentStats
    top_contexts: list[TopContext]
    logit_effects: LogitEffects | None = Field(description="null when the hook is not in the residual basis")
    task_attribution: dict[str, LatentTaskAttribution] = Field(description="task name -> attribution")


# ----------------------------------------------------------------------------- summary.json


class FeatureSummary(Document):
    """``summary.json`` of the feature analysis (rule ``features``).

    Besides the fields below it holds ``{task}_pearson``, ``{task}_spearman`` and
    ``{task}_sign_agreement`` (numbers) for every task with an attribution agreement.
    """

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, float]

    stage: Literal["features"]
    hook: str
    layer: int | None
    model: str
    architecture: str
    dictionary: str
    d_in: int
    d_sae: int
    config: dict[str, Any] = Field(description="the features config group")
    exclude_bos: bool
    n_tokens: int
    n_live: int
    n_dead: int
    dead_fraction: float
    n_records: int
    logit_effects: bool
    hist_log10_range: list[float]
    hist_bins_per_decade: int
    tasks: list[dict[str, Any]]


# ----------------------------------------------------------------------------- transcoder_features


class TranscoderFeaturesLayer(Document):
    """One layer of the transcoder set's feature analysis."""

    layer: int
    d_sae: int
    n_live: int = Field(description="features that fire on at least one of the stage's tokens")
    dead_fraction: float
    mean_l0: float = Field(description="active features per token, averaged over the stage's tokens")
    n_records: int = Field(description="features of this layer in features.jsonl")


class TranscoderFeaturesSummary(Document):
    """``dictionaries/transcoder_set/features/summary.json`` (rule ``transcoder_features``)."""

    stage: Literal["transcoder_features"]
    model: str
    transcoder_set: str = Field(description="the set.json analysed")
    kind: str
    n_layers: int
    n_tokens: int = Field(description="corpus tokens encoded per layer (position 0 of each context excluded)")
    config: dict[str, Any] = Field(description="the features config group")
    per_layer: list[TranscoderFeaturesLayer]
    n_records: int
    files: dict[str, str]
    seconds: float
