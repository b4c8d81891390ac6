"""Typed configs of the attribution stage's three rules, one Hydra group each:
``attribution`` (rule ``attribute``, `AttributionConfig`), ``analysis`` (rule ``analyze``,
`AnalysisConfig`) and ``causal_tracing`` (rule ``causal_trace``, `CausalTracingConfig`).

`workflow/schemas/config/{attribution,analysis,causal_tracing}.schema.json` are generated from them.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, Field, StrictBool, StrictFloat, StrictInt

from mechflow.config import GroupConfig, UniqueItems, config_model

Method = Literal["exact", "ap", "ig"]
METHODS: tuple[str, ...] = get_args(Method)


def _has_exact(methods: tuple[str, ...]) -> tuple[str, ...]:
    if "exact" not in methods:
        raise ValueError(f"{list(methods)!r} must include 'exact' (the reference every other method is compared "
                         "with)")
    return methods


@config_model("causal_tracing")
class CausalTracingConfig(GroupConfig):
    """Causal tracing (Meng et al. 2022) for tasks with subjects (factual_recall)."""

    n_prompts: StrictInt = Field(8, ge=1, description="prompts traced")
    kinds: Annotated[tuple[Literal["resid", "mlp", "attn"], ...], UniqueItems] = Field(
        ("resid", "mlp", "attn"), min_length=1, description="states restored: a subset of [resid, mlp, attn]")
    metric: Literal["probability", "task"] = Field(
        "probability", description="probability (ROME: P(answer)) or task (the task metric)")
    noise_scale: StrictFloat = Field(3.0, gt=0, description="noise sd as a multiple of std(W_E) (ROME: 3)")
    n_samples: StrictInt = Field(2, ge=1, description="noise draws averaged")
    window: StrictInt = Field(5, ge=1, description="layers restored together for mlp/attn")
    seed: StrictInt = Field(0, ge=0, description="noise seed")
    max_batch: StrictInt = Field(64, ge=1, description="sequences per forward")


@config_model("analysis")
class AnalysisConfig(GroupConfig):
    """Rules analyze / causal_trace: ablations, token saliency, neurons, causal tracing."""

    n_prompts: StrictInt = Field(8, ge=2, description="prompt pairs analysed (>= 2)")
    seed: StrictInt = Field(0, ge=0, description="resample-ablation seed")
    max_batch: StrictInt = Field(64, ge=1, description="sequences per forward")
    ablations: Annotated[tuple[Literal["zero", "mean", "resample"], ...], UniqueItems] = Field(
        ("zero", "mean", "resample"), description="ablation methods: a subset of [zero, mean, resample]")
    ig_steps: StrictInt = Field(32, ge=1, description="integrated-gradients points for token saliency")
    ig_baseline: Literal["corrupted", "zero"] = Field("corrupted",
                                                      description="IG baseline embeddings: corrupted or zero")
    ig_rtol: StrictFloat = Field(0.05, ge=0, description="relative tolerance of the IG completeness check")
    ig_atol: StrictFloat = Field(0.001, ge=0, description="absolute tolerance of the IG completeness check")
    ig_check: Literal["error", "flag"] = Field("error",
                                               description="error: fail when IG is incomplete; flag: record it")
    top_neurons: StrictInt = Field(10, ge=1, description="neurons listed per ranking")
    contexts_per_neuron: StrictInt = Field(5, ge=1, description="top-activating contexts per neuron")
    context_window: StrictInt = Field(8, ge=0, description="tokens kept before the hit")
    context_tokens: StrictInt = Field(8192, ge=1,
                                      description="corpus tokens scanned when the harvest lacks mlp.hook_post")
    context_batch: StrictInt = Field(8, ge=1, description="corpus contexts per forward")


@config_model("attribution")
class AttributionConfig(GroupConfig):
    """Node-level attribution of every task (rule `attribute`): exact patching, AP and IG per head and MLP."""

    methods: Annotated[tuple[Method, ...], UniqueItems, AfterValidator(_has_exact)] = Field(
        METHODS, min_length=1, json_schema_extra={"contains": {"const": "exact"}},
        description="node attribution methods to run: a subset of [exact, ap, ig] containing exact")
    n_prompts: StrictInt = Field(12, ge=2, description="prompt pairs used (>= 2): the first of the task's largest "
                                 "equal-length bucket")
    ig_steps: StrictInt = Field(4, ge=1, description="integrated-gradients points on the activation path (>= 1)")
    max_batch: StrictInt = Field(64, ge=1, description="sequences per forward in exact patching")
    head_type_threshold: StrictFloat = Field(0.4, ge=0, le=1, description="score needed for a head-type label, "
                                             "in [0, 1]")
    head_type_seqs: StrictInt = Field(8, ge=1, description="diagnostic sequences for head typing")
    head_type_seq_len: StrictInt = Field(32, ge=4, description="length of each diagnostic sequence")
    ioi_roles: StrictBool = Field(False, description="find IOI name-mover / S-inhibition candidates (slow)")
