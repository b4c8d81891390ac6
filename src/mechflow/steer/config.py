"""Typed config of the `steer` stage (`config/steer/*.yaml`, rule `steer`).
`workflow/schemas/config/steer.schema.json` is generated from it (`python -m mechflow.contracts.export`);
a unit test fails when they drift.

Units. A contrast direction is the *unnormalised* difference of means (positive minus negative), so
``alpha = 1`` adds exactly the mean gap between the two groups at that layer (ActAdd / CAA
convention: Turner et al. 2023, Rimsky et al. 2024); ``alpha = -1`` moves a positive prompt's
activation by the negatives' mean offset. A dictionary feature's strength is its multiplier ``k``
(``a -> k a``; ``k = 0`` is zero ablation, ``k = 1`` leaves the model unchanged).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, StrictBool, StrictInt, StrictStr

from mechflow.config import GroupConfig, config_model

Position = Literal["last", "mean"]


@config_model("steer")
class SteerConfig(GroupConfig):
    """Contrast directions, feature clamps, strength sweeps with side effects, controls and records
    (see `mechflow.steer.stage`)."""

    SELECTION_KEYS: ClassVar[tuple[str, ...]] = ("enabled", "tasks")  # which jobs exist

    enabled: StrictBool = Field(True, description="run the steer stage in this run")
    tasks: tuple[StrictStr, ...] = Field(("ioi", "factual_recall"), description="tasks steered (one job each); "
                                         "each must be selected in `task`")
    layers: tuple[StrictInt, ...] | None = Field(None, description="layers whose residual stream (hook_resid_pre) "
                                                 "gets a contrast direction (null: every layer)")
    layer: StrictInt | None = Field(None, description="layer steered (null: the layer of best held-out separation: "
                                    "AUC of the projection, ties broken by the standardised gap)")
    position: Position = Field("last", description="last: activations and steering at the final prompt token; "
                               "mean: activations averaged over the tokens after BOS, steering at all of them")
    feature_positions: Literal["all", "last"] = Field("all", description="where a feature is clamped: every position "
                                                      "after BOS (as the features stage ablates), or the last")
    contrast_file: StrictStr | None = Field(None, description="JSONL of {text, label: positive|negative} to learn "
                                            "the direction from (null: the task's clean / corrupted prompts)")
    heldout_fraction: float = Field(0.5, gt=0, lt=1, description="share of prompts held out from learning the "
                                    "directions and choosing features; every effect is measured on them")
    probe_l2: float = Field(1e-2, ge=0, description="L2 penalty of the logistic-regression probe")
    alphas: tuple[float, ...] = Field((-8.0, -4.0, -2.0, -1.0, -0.5, 0.5, 1.0, 2.0), min_length=1,
                                      description="strength grid of the contrast direction (units of the mean gap)")
    feature_scales: tuple[float, ...] = Field((-2.0, -1.0, 0.0, 0.5, 2.0, 4.0), min_length=0,
                                              description="multipliers k of a feature's activation (a -> k a)")
    feature_values: tuple[float, ...] = Field((), description="fixed values a feature is clamped to (a -> v)")
    n_features: StrictInt = Field(3, ge=0, description="SAE latents steered: the top ones by task attribution on the "
                                  "training prompts (0: none)")
    sae_features: tuple[StrictInt, ...] = Field((), description="SAE latents steered besides the attributed ones")
    n_transcoder_features: StrictInt = Field(1, ge=0, description="latents of the run's transcoder steered: the "
                                             "top ones by task attribution (single-layer transcoders; a CLT or "
                                             "multi-layer set is skipped with a note)")
    transcoder_features: tuple[StrictInt, ...] = Field((), description="transcoder latents steered besides those "
                                                       "(its MLP input encodes, its MLP output gets the edit)")
    error_term: StrictBool = Field(True, description="keep the dictionary's reconstruction error when clamping, so "
                                   "an unchanged activation leaves the model exactly as it is")
    target_effect: float = Field(-0.5, description="target of the normalised effect on held-out positive prompts: "
                                 "mean metric change / (positive mean - negative mean); -1: positives score like "
                                 "negatives, +1: one more gap in the positive direction")
    max_negative_kl: float = Field(0.5, ge=0, description="side-effect bound: mean KL (nats) of the next-token "
                                   "distribution of held-out negative prompts, steered vs unsteered")
    max_ce_increase: float = Field(0.1, ge=0, description="side-effect bound: CE increase (nats/token) on corpus "
                                   "text steered at every position")
    max_other_task_change: float = Field(0.25, ge=0, description="side-effect bound: |change| of another task's "
                                         "mean metric as a share of its clean - corrupted gap")
    corpus_contexts: StrictInt = Field(8, ge=1, description="corpus contexts of the CE side effect")
    corpus_tokens: StrictInt = Field(128, ge=2, description="tokens per corpus context (a prefix of each)")
    corpus_batch: StrictInt = Field(4, ge=1, description="corpus contexts per forward pass")
    other_prompts: StrictInt = Field(32, ge=1, description="prompts of each other task measured for side effects")
    n_random: StrictInt = Field(32, ge=0, description="random directions of the contrast direction's norm at the "
                                "same layer and strength (control)")
    n_generations: StrictInt = Field(3, ge=0, description="held-out positive prompts generated from with and "
                                     "without steering (greedy)")
    max_new_tokens: StrictInt = Field(12, ge=1, description="tokens generated per prompt")
    max_batch: StrictInt = Field(64, ge=1, description="sequences per forward pass")
    seed: StrictInt = Field(0, ge=0, description="the held-out split, random directions and shuffled labels")
