"""Typed configs of the feature stages: `features` (`config/features/*.yaml`, rule `features`) and
`feature_matching` (`config/feature_matching/default.yaml`, rule `feature_matching`).

`workflow/schemas/config/{features,feature_matching}.schema.json` are generated from these classes
(`python -m mechflow.contracts.export`); a unit test fails when they drift.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, StrictBool, StrictInt, StrictStr

from mechflow.config import GroupConfig, config_model

FeatureNull = Literal["shuffle", "circular_shift"]
FEATURE_NULLS: tuple[str, ...] = get_args(FeatureNull)


@config_model("features")
class FeaturesConfig(GroupConfig):
    """Feature analysis of the run's SAE (rule `features`; see `mechflow.features.stage`)."""

    n_features: StrictInt | None = Field(256, ge=1, description="feature records written (null: every live "
                                         "feature); the top task-attributed features are always included")
    selection: Literal["random", "frequency"] = Field(
        "random", description="which live features fill n_features: a seeded random sample, or the most frequent")
    top_contexts: StrictInt = Field(10, ge=1, description="top-activating contexts kept per feature")
    window: StrictInt = Field(8, ge=0, description="tokens shown on each side of the activating token")
    max_tokens: StrictInt | None = Field(None, ge=1,
                                         description="harvest rows streamed for contexts and stats (null: all)")
    batch_rows: StrictInt = Field(4096, ge=1, description="harvest rows encoded per step")
    n_logits: StrictInt = Field(10, ge=1, description="top promoted and suppressed tokens per feature (W_dec W_U)")
    tasks: tuple[StrictStr, ...] = Field(("ioi",), description="tasks for feature attribution; each must be "
                                         "selected in `task`")
    n_prompts: StrictInt = Field(16, ge=1,
                                 description="prompt pairs per task (first of the largest equal-length bucket)")
    ablation: Literal["corrupted", "zero"] = Field(
        "corrupted", description="what a latent is patched to: its corrupted-prompt value, or zero")
    error_term: StrictBool = Field(True, description="keep the SAE's reconstruction error in the spliced model "
                                   "(Marks et al. 2024), so the spliced model's output is the model's own")
    n_verify: StrictInt = Field(20, ge=0, description="top attributed features verified by exact ablation")
    max_batch: StrictInt = Field(64, ge=1, description="sequences per forward pass in the ablations")
    seed: StrictInt = Field(0, ge=0, description="seed of the random sample of live features (selection: random)")


@config_model("feature_matching")
class FeatureMatchingConfig(GroupConfig):
    """Cross-model SAE feature matching (rule `feature_matching`; see `mechflow.features.matching_stage`)."""

    seed: StrictInt = Field(0, ge=0, description="seed of the shared-text sample, the vocabulary sample, the "
                            "control directions and the permutation nulls")
    null_kind: FeatureNull = Field("shuffle", description="permutation null: permute or circularly shift the shared "
                              "axis (words, tokens) of model B")
    n_permutations: StrictInt = Field(100, ge=1, description="null draws; each costs one [f_a, f_b] correlation "
                                      "product")
