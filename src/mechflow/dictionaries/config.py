"""Typed configs of the dictionary stages (`config/sae/*.yaml`, `config/transcoder/*.yaml`,
`config/transcoder_set/*.yaml`).

`workflow/schemas/config/{sae,transcoder,transcoder_set}.schema.json` are generated from these models
(`python -m mechflow.contracts.export`); a unit test fails when they drift.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mechflow.errors import ConfigError

# JumpReLU threshold options shared by SAEs and transcoders (see mechflow.dictionaries.thresholds)
_TARGET_L0 = ("start each latent's threshold at the quantile of its pre-activations (on the norm-estimate "
              "batches) that gives this L0; null: every threshold starts at jumprelu_init_threshold")
_THRESHOLD_LR_SCALE = ("the thresholds' learning rate is lr x this (their own Adam param group); Adam moves a "
                       "threshold by about its lr per step, so a short run needs it to track the pre-activations")


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    GROUP: ClassVar[str] = ""  # the config group, for error messages (set on top-level groups)

    @classmethod
    def from_dict(cls, cfg: Any) -> Any:
        """Validate a composed config group; ConfigError naming `<group>.<field>` on bad input."""
        return parse_config(cls, cfg, cls.GROUP or cls.__name__)


class DataConfig(_Cfg):
    """How activation shards are streamed (see `mechflow.dictionaries.data`)."""

    batch_size: int = Field(4096, ge=1, description="activation vectors per training step")
    buffer_rows: int = Field(65536, ge=1, description="shuffle buffer (rows mixed across shards)")
    chunk_rows: int = Field(2048, ge=1, description="contiguous rows read per chunk (shuffle granularity)")
    holdout_shards: int = Field(1, ge=0, description="last N shards of the manifest kept for evaluation")
    exclude_bos: bool = Field(True, description="drop position 0 when the manifest says prepend_bos")
    drop_outliers: float | None = Field(
        None, gt=0, description="drop TRAINING rows whose norm (of the first hook) exceeds this x the median norm "
        "of the training rows (massive-activation / attention-sink positions); null: keep every row. "
        "Evaluation is unchanged: it still splices and counts them")
    clip_outliers: float | None = Field(
        None, gt=0, description="rescale TRAINING rows whose norm exceeds this x the median norm down to that norm "
        "(direction kept), so attention-sink positions are still learnt but no longer dominate the MSE loss; "
        "null: rows as harvested. SAEs only (an MLP is not linear in its input); not with drop_outliers. "
        "Evaluation is unchanged")
    verify_sha256: bool = Field(True, description="check every shard against its manifest sha256")
    prefetch: int = Field(2, ge=0, description="batches prepared ahead in a background thread")


class EvalConfig(_Cfg):
    """Held-out evaluation (`evaluate_dictionary`)."""

    max_tokens: int = Field(65536, ge=1, description="held-out (non-BOS) tokens for reconstruction metrics")
    outlier_factor: float = Field(5.0, gt=0, description="positions with norm > factor x median are outliers")
    dead_min_tokens: int = Field(10000, ge=1, description="dead = never fires on at least this many tokens")
    dense_threshold: float = Field(0.1, gt=0, le=1, description="dense = fires on more than this fraction")
    ce_contexts: int = Field(32, ge=0, description="held-out contexts for CE/KL with the dictionary spliced in")
    ce_batch_size: int = Field(8, ge=1, description="contexts per model forward")
    batch_size: int = Field(4096, ge=1, description="rows per dictionary forward")


class SAEConfig(_Cfg):
    """An SAE trained with SAELens' `SAETrainer` on one hook's activation shards."""

    GROUP: ClassVar[str] = "sae"

    hook: str | None = Field("blocks.15.hook_resid_post",
                             description="expected manifest hook (null: whatever the manifest holds)")
    architecture: Literal["topk", "batchtopk", "jumprelu", "standard", "gated", "matryoshka_batchtopk"] = "topk"
    d_in: int | None = Field(None, ge=1, description="input width; null = the manifest's d (must match if set)")
    d_sae: int = Field(4608, ge=1)
    k: int = Field(32, ge=1, description="active latents (topk, batchtopk, matryoshka_batchtopk)")
    l1_coefficient: float = Field(5.0, ge=0, description="sparsity coefficient (standard, gated)")
    l1_warm_up_steps: int = Field(0, ge=0)
    l0_coefficient: float = Field(1.0, ge=0, description="L0 coefficient (jumprelu)")
    jumprelu_init_threshold: float = Field(0.01, ge=0)
    jumprelu_target_l0: float | None = Field(None, gt=0, description="jumprelu: " + _TARGET_L0)
    jumprelu_threshold_lr_scale: float = Field(1.0, gt=0, description="jumprelu: " + _THRESHOLD_LR_SCALE)
    jumprelu_bandwidth: float = Field(0.05, gt=0)
    matryoshka_widths: list[int] | None = Field(None, description="nested widths (matryoshka_batchtopk)")
    aux_loss_coefficient: float = Field(1.0, ge=0, description="TopK dead-latent auxiliary loss (topk family)")
    normalize_activations: Literal["none", "expected_average_only_in"] = "expected_average_only_in"
    n_batches_for_norm_estimate: int = Field(10, ge=1)
    b_dec_init: Literal["mean", "zeros"] = Field(
        "mean", description="mean: start b_dec at the activation mean (over the norm-estimate batches)")
    decoder_init_norm: float | None = 0.1
    training_tokens: int = Field(1_000_000, ge=1, description="activation vectors seen in training")
    lr: float = Field(4e-4, gt=0)
    # SAELens' schedulers (sae_lens.training.optim); warm-up and decay wrap any of them
    lr_scheduler_name: Literal["constant", "cosineannealing", "cosineannealingwarmrestarts"] = "constant"
    lr_end: float | None = Field(None, ge=0, description="final lr of decaying schedules (null: lr / 10)")
    lr_warm_up_steps: int = Field(0, ge=0)
    lr_decay_steps: int = Field(0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    dead_feature_window: int = Field(200, ge=1, description="steps without firing before a latent counts dead")
    feature_sampling_window: int = Field(500, ge=1)
    n_checkpoints: int = Field(0, ge=0, description="intermediate checkpoints (resumable training)")
    log_every: int = Field(10, ge=1, description="steps between recorded training-curve points")
    seed: int = 0
    device: str = "cpu"
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


class TranscoderConfig(_Cfg):
    """A (skip / cross-layer) JumpReLU transcoder trained by `mechflow.dictionaries.transcoder`."""

    GROUP: ClassVar[str] = "transcoder"

    kind: Literal["per_layer", "skip", "clt"] = "per_layer"
    layers: list[int] = Field(default_factory=lambda: [15], description="layers; a CLT spans them in order")
    in_hook: str = Field("blocks.{layer}.ln2.hook_normalized", description="MLP input hook template")
    out_hook: str = Field("blocks.{layer}.hook_mlp_out", description="MLP output hook template")
    d_sae: int = Field(4608, ge=1, description="latents per layer")
    jumprelu_init_threshold: float = Field(0.05, ge=0)
    target_l0: float | None = Field(None, gt=0, description=_TARGET_L0 + " (per layer)")
    threshold_lr_scale: float = Field(1.0, gt=0, description=_THRESHOLD_LR_SCALE)
    jumprelu_bandwidth: float = Field(0.05, gt=0)
    sparsity_mode: Literal["tanh", "step"] = Field(
        "tanh", description="tanh: Anthropic's tanh(c*f*||W_dec||) penalty; step: DeepMind's L0 via STE")
    sparsity_coefficient: float = Field(1e-3, ge=0)
    sparsity_warm_up_steps: int = Field(0, ge=0)
    tanh_scale: float = Field(4.0, gt=0)
    pre_act_loss_coefficient: float = Field(0.0, ge=0, description="Anthropic's anti-dead-latent loss")
    l0_control_kp: float = Field(0.0, ge=0, description=(
        "L0 controller, proportional gain: with e = log(L0 / target_l0) (L0: moving average of the "
        "training batches' L0, after the warm-up) the sparsity coefficient is multiplied by "
        "exp(kp * e + ki * sum of e over the steps so far); 0 and 0: a fixed coefficient"))
    l0_control_ki: float = Field(0.0, ge=0, description="L0 controller, integral gain (see l0_control_kp)")
    training_tokens: int = Field(1_000_000, ge=1)
    lr: float = Field(2e-4, gt=0)
    lr_warm_up_steps: int = Field(0, ge=0)
    lr_decay_fraction: float = Field(0.2, ge=0, le=1, description="final fraction of steps with linear lr decay")
    n_batches_for_norm_estimate: int = Field(10, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = 0
    device: str = "cpu"
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _controller_needs_target(self) -> TranscoderConfig:
        if (self.l0_control_kp > 0 or self.l0_control_ki > 0) and self.target_l0 is None:
            raise ValueError("the L0 controller (l0_control_kp / l0_control_ki > 0) tracks target_l0: set target_l0 "
                             "(e.g. 64) or both gains to 0")
        return self


class TranscoderSetConfig(TranscoderConfig):
    """Per-layer transcoders for every MLP (`config/transcoder_set/`): the replacement model of the
    attribution-graph stage. The recipe fields are `TranscoderConfig`'s; each layer is one job
    (rule `train_layer_transcoder`), reading shards that rule `harvest_layers` writes for a group of
    `layers_per_harvest` layers and Snakemake deletes once every layer of the group is trained."""

    GROUP: ClassVar[str] = "transcoder_set"

    kind: Literal["per_layer", "skip"] = Field(
        "per_layer", description="per_layer | skip (W_skip x added); a graph needs one transcoder per MLP")
    layers: Literal["all"] | list[int] = Field(
        "all", description="all: every layer of the model; or a list (a graph needs them all)")
    layers_per_harvest: int = Field(
        5, ge=1, description="layers whose MLP in/out one harvest job writes (one forward pass up to the last of "
        "them); peak disk is about this x 2 hooks x the harvest size, times the jobs alive at once")
    harvest_max_contexts: int | None = Field(
        None, ge=1, description="harvest only the first N corpus contexts for the set (null: as harvest.max_contexts)")

    def layer_list(self, n_layers: int) -> list[int]:
        """The layers of the set for a model with ``n_layers`` layers (one clear error if out of range)."""
        layers = list(range(n_layers)) if self.layers == "all" else list(self.layers)
        bad = [layer for layer in layers if not 0 <= layer < n_layers]
        if bad or layers != sorted(set(layers)) or not layers:
            raise ConfigError(f"transcoder_set.layers={self.layers}: give increasing layers in [0, {n_layers - 1}] "
                              "or 'all'")
        return layers

    def harvest_groups(self, n_layers: int) -> list[list[int]]:
        layers = self.layer_list(n_layers)
        return [layers[i:i + self.layers_per_harvest] for i in range(0, len(layers), self.layers_per_harvest)]

    def for_layer(self, layer: int) -> TranscoderConfig:
        """The one-layer `TranscoderConfig` that rule `train_layer_transcoder` trains."""
        fields = self.model_dump(exclude={"layers", "layers_per_harvest", "harvest_max_contexts"})
        return TranscoderConfig.model_validate({**fields, "layers": [layer]})


def parse_config(model: type[_Cfg], cfg: Any, group: str) -> Any:
    """Validate `cfg` (dict, DictConfig or model) into `model`; raise ConfigError naming the field."""
    if isinstance(cfg, model):
        return cfg
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        try:
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        except Exception as exc:  # not an OmegaConf object either
            raise ConfigError(f"{group}: expected a mapping, got {type(cfg).__name__}") from exc
    cfg = {k: v for k, v in cfg.items() if k != "defaults"}
    try:
        return model.model_validate(cfg)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in (group, *err["loc"]))
        raise ConfigError(f"{field}: {err['msg']} (got {err.get('input')!r}); see "
                          f"workflow/schemas/config/{group}.schema.json for allowed values") from exc


def json_schemas() -> dict[str, dict]:
    draft = {"$schema": "https://json-schema.org/draft/2020-12/schema"}  # jsonschema/snakemake detect the dialect
    return {"sae": {**draft, **SAEConfig.model_json_schema()},
            "transcoder": {**draft, **TranscoderConfig.model_json_schema()},
            "transcoder_set": {**draft, **TranscoderSetConfig.model_json_schema()}}
