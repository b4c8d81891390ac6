"""Statistics files: ``stability.json``, ``fcas.json``, ``cka.json`` and ``feature_matching.json``.

The tables (``bootstrap.parquet``, ``cka.parquet``) are in `mechflow.contracts.parquet`. NaN
never reaches a file: undefined numbers are null.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mechflow.contracts.documents import Document

Summary = dict[str, float | None]  # n, n_nan, mean, q<quantile>... of a distribution (`stability.summarize`)

# ----------------------------------------------------------------------------- stability.json


class PairwiseStabilityBlock(Document):
    """Kendall tau-b and top-k Jaccard between rankings (matrices in ``names`` order)."""

    names: list[str]
    k: int
    tau_b: list[list[float | None]]
    jaccard_top_k: list[list[float | None]]
    tau_summary: Summary = Field(description="over the off-diagonal pairs")
    jaccard_summary: Summary


class Skipped(Document):
    skipped: str = Field(description="why this analysis did not run")


class BootstrapRankStability(Document):
    tau_summary: Summary = Field(description="tau-b between the full-sample ranking and each resample's")
    jaccard_summary: Summary
    top_k_frequency: dict[str, float] = Field(description="component -> share of resamples with it in the top k")


class TemplateStability(Document):
    n_prompts_per_template: dict[str, int]
    templates: list[str] = Field(description="templates with at least 2 prompts (the ones compared)")
    skipped: str | None = None
    by_method: dict[str, dict[str, PairwiseStabilityBlock]] | None = Field(
        None, description="method -> ranking (signed | abs) -> stability across templates")


class StabilityDocument(Document):
    """``stability.json`` of the statistics stage (one model, one task)."""

    k: int
    n_prompts: int
    n_components: int
    methods: list[str]
    B: int = Field(description="bootstrap resamples")
    seed: int
    rankings: dict[str, str] = Field(description="ranking name -> what it ranks by")
    methods_pairwise: dict[str, PairwiseStabilityBlock] | Skipped = Field(
        description="ranking -> stability between methods (skipped with one method)")
    bootstrap: dict[str, dict[str, BootstrapRankStability]] = Field(description="method -> ranking -> stability")
    templates: TemplateStability


# ----------------------------------------------------------------------------- fcas.json


class FcasSide(Document):
    component: str = Field(description="MIB component name")
    layer: int
    depth: float = Field(description="(layer + 0.5) / n_layers")
    label: str
    score: float = Field(description="mean exact-patching score")


class FcasPair(Document):
    a: FcasSide
    b: FcasSide
    similarity: float | None


class FcasDocument(Document):
    """``fcas.json`` of the cross-model stage."""

    definition: str
    attribution: str
    model_a: str
    model_b: str
    n_layers_a: int
    n_layers_b: int
    labels: str = Field(description="where the component labels came from")
    k: int
    score: float | None
    pairs: list[FcasPair]
    null_kind: str
    n_permutations: int
    seed: int
    p_value: float | None
    p_value_randomized: float | None
    z: float | None
    null_mean: float | None
    null_std: float | None
    null_quantiles: dict[str, float | None]


# ----------------------------------------------------------------------------- cka.json


class CkaLayerRow(Document):
    layer_a: int
    depth_a: float
    depth_matched_layer_b: int
    depth_matched_cka: float
    depth_matched_cka_debiased: float | None
    best_layer_b: int
    best_cka: float
    shuffled_cka: float | None = None
    shuffled_cka_debiased: float | None = None


class CkaDocument(Document):
    """``cka.json`` of the cross-model stage (with ``stats`` CKA enabled)."""

    model_a: str
    model_b: str
    hook: str = Field(description="TransformerLens hook template read in both models")
    position: str
    n_prompts: int
    n_prompts_a: int
    n_prompts_b: int
    n_shared: int
    prompts: str
    estimators: str
    mean_depth_matched_cka: float
    mean_depth_matched_cka_debiased: float | None
    by_layer_a: list[CkaLayerRow]
    mean_shuffled_cka: float | None = None
    mean_shuffled_cka_debiased: float | None = None
    n_shuffles: int | None = None


# ----------------------------------------------------------------------------- feature_matching.json


class FeatureTexts(Document):
    n_texts: int
    n_task_prompts: int
    n_task_prompts_available: int
    n_corpus_passages: int
    tasks: list[str]
    n_words: int
    n_words_used: int
    n_words_dropped: int


class SharedVocabulary(Document):
    n_shared: int
    n_used: int
    max_vocab: int
    examples: list[str]


class MatchHistogram(Document):
    edges: list[float]
    observed: list[int]
    null: list[int]
    control: list[int] | None = None


class MatchPairs(Document):
    a: list[int]
    b: list[int]
    corr: list[float]


class ControlMatch(Document):
    latents: str = Field(description="what the control latents are")
    k: int | None = None
    mean_l0_a: float | None = None
    mean_l0_b: float | None = None
    n_matched: int
    threshold: float
    n_matched_above_control: int
    fraction_matched: float
    best_corr_mean: float
    best_corr_quantiles: dict[str, float]
    best_corr: list[float]


class TopPair(Document):
    a: int
    b: int
    corr: float
    p_value: float
    is_best_match: bool
    corr_logit: float | None = Field(None, description="in the activation block: the pair's logit-effect correlation")
    corr_activation: float | None = Field(None, description="in the logit block: the pair's activation correlation")
    tokens_a: list[str]
    tokens_b: list[str]
    words_a: list[str]
    words_b: list[str]


class ProfileMatchDocument(Document):
    """One profile's matching (latent indices are global)."""

    n_rows: int
    d_sae_a: int
    d_sae_b: int
    n_live_a: int
    n_live_b: int
    min_active: int
    n_excluded_a: int
    n_excluded_b: int
    threshold_quantile: float
    threshold: float
    n_matched: int
    fraction_matched: float
    n_expected_by_chance: float
    n_pairs_matched: int
    p_min: float
    n_p_min: int
    n_p_le_005: int = Field(alias="n_p_le_0.05")
    best_corr_mean: float
    best_corr_quantiles: dict[str, float]
    null_mean: float
    null_quantiles: dict[str, float]
    hist: MatchHistogram
    features_a: list[int]
    best_b: list[int]
    best_corr: list[float]
    p_value: list[float]
    excluded_features_a: list[int]
    excluded_features_b: list[int]
    pairs: MatchPairs
    control: ControlMatch | None
    top_pairs: list[TopPair]


class ProfileAgreement(Document):
    n_same_pairs: int
    n_same_pairs_matched_in_both: int
    n_same_pairs_expected_by_chance: float


class FeatureMatchingDocument(Document):
    """``feature_matching.json`` of the cross-model feature-matching stage."""

    stage: Literal["feature_matching"]
    definition: str
    model_a: str
    model_b: str
    hook_a: str
    hook_b: str
    d_sae_a: int
    d_sae_b: int
    dictionary_a: str
    dictionary_b: str
    null_kind: str
    n_permutations: int
    seed: int
    texts: FeatureTexts
    vocabulary: SharedVocabulary | None
    logit_effects: bool
    activation: ProfileMatchDocument
    logit: ProfileMatchDocument | None = None
    agreement: ProfileAgreement | None = None
    seconds: dict[str, float] = Field(description="step -> wall seconds")
