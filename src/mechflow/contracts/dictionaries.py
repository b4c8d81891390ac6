"""Dictionary files: ``training.json``, ``transcoder.json``, ``clt_cfg.json``, checkpoint
``data_state.json``, ``sae_metrics.json`` / ``transcoder_metrics.json`` (the feature analysis'
files are in `mechflow.contracts.features`).

The weights folders themselves are in SAELens' format (``cfg.json``, ``sae_weights.safetensors``),
which SAELens defines; see `mechflow.dictionaries.transcoder` for the multi-layer layout.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from mechflow.contracts.documents import Document

# ----------------------------------------------------------------------------- held-out metrics


class ReconstructionMetrics(Document):
    """Held-out reconstruction of one SAE / per-layer transcoder (`reconstruction_metrics`).

    Headline numbers exclude outlier positions (norm > ``outlier_factor`` x median); the
    ``*_with_outliers`` twins include them.
    """

    n_tokens: int = Field(description="held-out rows (non-BOS positions when BOS is excluded)")
    median_norm: float
    outlier_factor: float
    n_outliers: int
    outlier_fraction: float
    explained_variance: float
    fvu: float = Field(description="fraction of variance unexplained = 1 - explained_variance")
    mse: float
    explained_variance_with_outliers: float
    fvu_with_outliers: float
    mse_with_outliers: float
    l0: float = Field(description="mean active latents per token")
    d_sae: int
    dead_features: int
    dead_fraction: float
    dead_window_tokens: int
    dead_window_sufficient: bool
    dense_threshold: float
    dense_features: int
    dense_fraction: float


class StackHeldoutMetrics(Document):
    """Held-out reconstruction of a multi-layer transcoder stack or CLT (`heldout_metrics`)."""

    n_tokens: int
    fvu_per_layer: list[float]
    fvu: float
    explained_variance: float
    l0_per_layer: list[float]
    dead_fraction: float
    dead_window_tokens: int
    dead_window_sufficient: bool


class SpliceMetrics(Document):
    """CE / KL with the dictionary spliced in, and with its hook(s) zero- and mean-ablated
    (`ce_metrics`); absent when ``eval.ce_contexts`` is 0."""

    ce_clean: float | None = None
    ce_spliced: float | None = None
    ce_zero: float | None = None
    ce_mean: float | None = None
    kl_spliced: float | None = None
    kl_zero: float | None = None
    kl_mean: float | None = None
    n_predictions: int | None = None
    ce_increase: float | None = Field(None, description="ce_spliced - ce_clean")
    ce_recovered_zero: float | None = Field(None, description="(ce_zero - ce_spliced) / (ce_zero - ce_clean)")
    ce_recovered_mean: float | None = None
    kl_score_zero: float | None = None
    kl_score_mean: float | None = None
    ce_contexts: int | None = Field(None, description="held-out contexts the CE / KL numbers average over")


class DictionaryMetrics(ReconstructionMetrics, SpliceMetrics):
    """``sae_metrics.json`` (and ``transcoder_metrics.json`` of a single-layer per-layer/skip
    transcoder): written by ``evaluate_dictionary``."""

    stage: Literal["evaluate_dictionary"]
    dictionary: str
    architecture: str
    hook: str
    holdout_shards: list[str]
    exclude_bos: bool


class TranscoderStackMetrics(StackHeldoutMetrics, SpliceMetrics):
    """``transcoder_metrics.json`` of a multi-layer stack or CLT: written by ``evaluate_transcoder``."""

    stage: Literal["evaluate_transcoder"]
    dictionary: str
    kind: str
    layers: list[int]
    in_hooks: list[str]
    out_hooks: list[str]
    holdout_shards: list[str]
    exclude_bos: bool
    l0: float = Field(description="latents active per token, summed over the stack's layers")
    l0_definition: str


TranscoderMetrics = Annotated[DictionaryMetrics | TranscoderStackMetrics, Field(discriminator="stage")]

# ----------------------------------------------------------------------------- training


class SaeTraining(Document):
    """``training.json`` of an SAE folder (``train_sae``)."""

    stage: Literal["train_sae"]
    config: dict[str, Any] = Field(description="the sae config group as trained")
    model: str
    hook: str
    d_in: int
    architecture: str
    manifest: str
    manifest_sha256: str
    train_shards: list[str]
    holdout_shards: list[str]
    exclude_bos: bool
    outlier_filter: dict[str, Any] | None
    threshold_init: dict[str, Any] | None
    training_tokens: int
    training_steps: int
    seconds: float
    tokens_per_second: float
    final_train: dict[str, float] = Field(description="the last logged training point")
    sae_lens_metadata: dict[str, Any]
    heldout: ReconstructionMetrics | None
    data_state: dict[str, int] = Field(description="ActivationStream position at the end of training")
    resumed_from: str | None


class TranscoderTraining(Document):
    """``training.json`` of a transcoder folder (``train_transcoder``)."""

    stage: Literal["train_transcoder"]
    config: dict[str, Any] = Field(description="the transcoder config group as trained")
    model: str
    kind: str
    layers: list[int]
    in_hooks: list[str]
    out_hooks: list[str]
    manifests_sha256: dict[str, str]
    train_shards: list[str]
    holdout_shards: list[str]
    exclude_bos: bool
    outlier_filter: dict[str, Any] | None
    training_steps: int
    training_tokens: int
    seconds: float
    tokens_per_second: float
    in_scale: list[float]
    out_scale: list[float]
    final_train: dict[str, float]
    threshold_init: dict[str, Any] | None
    heldout: StackHeldoutMetrics | None


DictionaryTraining = Annotated[SaeTraining | TranscoderTraining, Field(discriminator="stage")]


class SaeDataState(Document):
    """``data_state.json`` of a training checkpoint (resume state; written last: marks it complete)."""

    stream: dict[str, int]
    manifest_sha256: str
    config_hash: str


class TranscoderIndex(Document):
    """``transcoder.json``: what a transcoder folder holds."""

    kind: str = Field(description="per_layer | skip | clt")
    layers: list[int]
    in_hooks: list[str]
    out_hooks: list[str]
    d_in: int
    d_out: int
    d_sae: int
    files: list[str] = Field(description="clt: [clt_cfg.json, clt_weights.safetensors]; else the layer_<l> folders")


class CltConfig(Document):
    """``clt_cfg.json`` of a cross-layer transcoder."""

    architecture: Literal["jumprelu_clt"]
    kind: Literal["clt"]
    layers: list[int]
    in_hooks: list[str]
    out_hooks: list[str]
    d_in: int
    d_out: int
    d_sae: int
    bandwidth: float
    dtype: str
    metadata: dict[str, Any]


class TranscoderSetLayer(Document):
    """One layer of the transcoder set: held-out metrics from its ``training.json``."""

    layer: int
    fvu: float = Field(description="held-out fraction of MLP-output variance unexplained")
    l0: float = Field(description="mean active latents per held-out token")
    dead_fraction: float = Field(description="latents that never fire on the held-out tokens")
    heldout_tokens: int
    training_seconds: float
    training: str = Field(description="the layer's training.json")


class WholeModelReplacement(SpliceMetrics):
    """CE / KL with every MLP of the set replaced by its transcoder at once (empty when
    ``eval.ce_contexts`` is 0)."""

    mean_source: str | None = None


class TranscoderSetDocument(Document):
    """``dictionaries/transcoder_set/set.json``: written by ``transcoder_set``."""

    stage: Literal["transcoder_set"]
    kind: str
    layers: list[int]
    in_hooks: list[str]
    out_hooks: list[str]
    d_sae: int
    per_layer: list[TranscoderSetLayer]
    mean_fvu: float
    max_fvu: float
    mean_l0: float
    mean_dead_fraction: float
    training_seconds: float = Field(description="sum of the layers' training times (CPU jobs may overlap)")
    whole_model: WholeModelReplacement
    circuit_tracer: str = Field(description="folder of the set in circuit-tracer's transcoder_set layout")
    folders: list[str] = Field(description="the layers' SAELens transcoder folders")
