"""Typed config of the `audit` stage (`config/audit/*.yaml`, rule `audit`).
`workflow/schemas/config/audit.schema.json` is generated from it (`python -m mechflow.contracts.export`);
a unit test fails when they drift.

The audit is opt in (``enabled: false``), like the ACDC benchmark: it needs an endpoint. The API key is
never part of the config: ``api_key_env`` names the environment variable that holds it.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator

from mechflow.config import FieldError, GroupConfig, config_model

ProbeKind = Literal["decision", "paraphrase", "refusal"]
BUILTIN_PREFIX = "builtin:"


@config_model("audit.probes")
class ProbeSpec(GroupConfig):
    """One probe of the audit: a kind (how its items are asked and scored) and a JSONL file of items."""

    name: StrictStr = Field(description="the probe's name in the outputs (unique within the audit)")
    kind: ProbeKind = Field(description="decision: templated two-option decisions over attribute values; "
                            "paraphrase: one question in several wordings; refusal: benign / harmful pairs")
    file: StrictStr = Field(description="JSONL of the probe's items: a path (relative to the working directory) "
                            "or builtin:<name>.jsonl for a file shipped in mechflow/audit/data")


@config_model("audit")
class AuditConfig(GroupConfig):
    """A black-box behavioural audit of a model behind an OpenAI-compatible endpoint (`mechflow.audit.stage`)."""

    SELECTION_KEYS: ClassVar[tuple[str, ...]] = ("enabled",)  # whether the job exists

    enabled: StrictBool = Field(False, description="run the audit in this run (opt in: it needs an endpoint)")
    base_url: StrictStr | None = Field(None, description="the endpoint's base URL, ending in /v1 "
                                       "(e.g. http://127.0.0.1:8000/v1); required when enabled")
    model: StrictStr | None = Field(None, description="model name sent in each request (null: the one model "
                                    "GET /models lists; an error when it lists several)")
    api_key_env: StrictStr | None = Field(None, description="name of the environment variable holding the API "
                                          "key (sent as a Bearer token; never written anywhere); null: no key")
    api: Literal["chat", "completions"] = Field("chat", description="endpoint of the decision, paraphrase and "
                                                "refusal probes: /chat/completions or /completions")
    timeout_s: float = Field(60.0, gt=0, description="seconds one request may take before it is retried")
    max_retries: StrictInt = Field(6, ge=0, description="retries of one request after a 429, a 5xx, a connection "
                                   "error, a timeout or a body that is not JSON")
    backoff_s: float = Field(0.5, gt=0, description="first retry delay; doubled per retry, with jitter")
    backoff_max_s: float = Field(30.0, gt=0, description="longest retry delay (also caps a Retry-After)")
    requests_per_s: float = Field(5.0, gt=0, description="client-side rate limit (requests started per second)")
    max_concurrency: StrictInt = Field(4, ge=1, description="requests in flight at once")
    temperature: float = Field(0.0, ge=0, description="sampling temperature of every request (0: greedy)")
    seed: StrictInt = Field(0, ge=0, description="seed sent with every request (servers that honour it are "
                            "deterministic), and the seed of the bootstrap and permutations")
    top_logprobs: StrictInt = Field(20, ge=0, le=20, description="alternatives asked per generated token (0: "
                                    "no logprobs; decisions are then scored from sampled answers)")
    max_tokens: StrictInt = Field(48, ge=1, description="tokens generated for an open answer (refusal probes)")
    answer_tokens: StrictInt = Field(8, ge=1, description="tokens generated for a short answer that names an option "
                                     "(paraphrase probes)")
    max_items: StrictInt | None = Field(None, ge=1, description="first items of each probe file asked (null: all); "
                                        "for a quick audit")
    decision_samples: StrictInt = Field(5, ge=1, description="answers sampled per decision prompt when the "
                                        "endpoint gives no logprobs (temperature 1, seeds seed..seed+n-1)")
    probes: tuple[ProbeSpec, ...] = Field(
        (ProbeSpec(name="loan_gender_origin", kind="decision", file="builtin:decision_loan.jsonl"),
         ProbeSpec(name="factual_paraphrase", kind="paraphrase", file="builtin:paraphrase.jsonl"),
         ProbeSpec(name="refusal_pairs", kind="refusal", file="builtin:refusal_pairs.jsonl")),
        description="the probes asked; add your own as {name, kind, file} entries with a JSONL file")
    replay: StrictStr | None = Field(None, description="responses.jsonl of an earlier audit of the same endpoint: "
                                     "its answers are used instead of asking again (re-scoring offline); requests "
                                     "it lacks are sent")
    whitebox_tasks: tuple[StrictStr, ...] = Field(("ioi", "factual_recall", "greater_than"), description="tasks "
                                                  "of the run asked through /completions with logprobs (each must "
                                                  "be selected in `task`; [] for none)")
    whitebox_prompts: StrictInt = Field(32, ge=1, description="first prompts of each task's dataset asked")
    n_boot: StrictInt = Field(2000, ge=100, description="bootstrap resamples of every confidence interval")
    n_perm: StrictInt = Field(2000, ge=100, description="permutations of the 'attribute has no effect' test")
    ci_level: float = Field(0.95, gt=0, lt=1, description="coverage of the confidence intervals")

    @field_validator("probes")
    @classmethod
    def _unique_names(cls, probes: tuple[ProbeSpec, ...]) -> tuple[ProbeSpec, ...]:
        names = [p.name for p in probes]
        if len(set(names)) != len(names):
            raise ValueError(f"probe names must be unique, got {names}: rename one")
        return probes

    @model_validator(mode="after")
    def _endpoint_when_enabled(self) -> AuditConfig:
        if self.enabled and not self.base_url:
            raise FieldError("base_url", "is not set but audit.enabled is true: give the endpoint, e.g. "
                             "audit.base_url=http://127.0.0.1:8000/v1 (python -m mechflow.audit.serve serves one)")
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise FieldError("base_url", f"= {self.base_url!r} is not an http(s) URL: e.g. http://127.0.0.1:8000/v1")
        return self
