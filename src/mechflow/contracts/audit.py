"""Files of the `audit` stage (``results/<run>/audit/``): ``responses.jsonl`` (one `StoredExchange` per
line: every request the audit's scores rest on and the endpoint's answer, with timing), ``scores.jsonl``
(one `ScoreRecord` per asked text: what was read out of its answer) and ``summary.json``
(`AuditSummary`: the endpoint, dates, every probe's metrics with CIs, the stored responses' sha256).
The API key appears in none of them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mechflow.contracts.documents import Document, VersionedDocument


class StoredExchange(Document):
    """One request and the endpoint's answer (a line of ``responses.jsonl``)."""

    key: str = Field(description="sha256 of the canonical JSON of (base URL, endpoint, body): the request's identity")
    endpoint: str = Field(description="/chat/completions, /completions")
    request: dict = Field(description="the JSON body sent (no headers: the key is never stored)")
    response: dict = Field(description="the JSON body received")
    status: int
    attempts: int = Field(description="tries until this answer (retries after 429 / 5xx / timeouts included)")
    elapsed_s: float = Field(description="seconds of the answered try")
    started_at: str = Field(description="UTC start of the answered try (ISO 8601)")


class ScoreRecord(Document):
    """What was read out of one answer (a line of ``scores.jsonl``)."""

    probe: str
    kind: Literal["decision", "paraphrase", "refusal", "whitebox"]
    item: str = Field(description="the item's id (scenario, question, prompt pair member, task prompt id)")
    keys: list[str] = Field(description="request keys of the answers this record reads (responses.jsonl)")
    group: str | None = Field(None, description="decision: the value's group; refusal: benign | harmful; "
                              "whitebox: the task")
    value: str | None = Field(None, description="decision: the attribute value asked; whitebox: the wrong answer")
    label: str | None = Field(None, description="decision / paraphrase: the expected option, if the item has one; "
                              "whitebox: the answer")
    score: float | None = Field(None, description="decision: log p(favourable) - log p(unfavourable); whitebox: "
                                "log p(answer) - log p(wrong answer) when both are in the top k")
    bounded: bool | None = Field(None, description="decision: an option was outside the top k, so the score is a "
                                 "bound (its sign is right)")
    method: Literal["logprobs", "samples", "text"] | None = Field(None, description="how the answer was read")
    answer: str | None = Field(None, description="the option / decision read (null: none could be read)")
    correct: bool | None = Field(None, description="paraphrase / whitebox: the answer was the expected one")
    refused: bool | None = Field(None, description="refusal: the answer matched a refusal pattern")
    text: str | None = Field(None, description="the generated text (first choice)")


class EstimateDoc(Document):
    value: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None = Field(None, description="permutation p-value of 'the attribute has no effect' "
                                  "(gap statistics of decision probes)")


class DecisionResult(Document):
    groups: list[str]
    n_scenarios: int = Field(description="scenarios with an answer for every group (the resampling unit)")
    n_values: int
    mean_score: dict[str, EstimateDoc] = Field(description="per group: mean log p(favourable) - log p(unfavourable)")
    yes_rate: dict[str, EstimateDoc] = Field(description="per group: share of values decided favourably")
    score_gap: EstimateDoc = Field(description="largest between-group gap of mean_score")
    parity_gap: EstimateDoc = Field(description="demographic parity difference: max - min yes_rate")
    odds_gap: EstimateDoc = Field(description="equalized-odds difference w.r.t. the items' labels")
    flip_rate: EstimateDoc = Field(description="share of cross-group value pairs of a scenario decided differently")


class ProbeResult(Document):
    name: str
    kind: Literal["decision", "paraphrase", "refusal"]
    file: str
    file_sha256: str
    n_items: int
    n_requests: int
    method: Literal["logprobs", "samples", "text"] = Field(description="how answers were read (decision: "
                                                           "logprobs if the endpoint gave them, else samples)")
    decision: DecisionResult | None = None
    metrics: dict = Field(default_factory=dict, description="paraphrase / refusal metrics, each {value, ci_low, "
                          "ci_high} or a count")
    notes: list[str] = Field(default_factory=list)


class WhiteboxResult(Document):
    task: str
    metric: str = Field(description="the task's white-box metric (baseline.json)")
    n_prompts: int
    api_accuracy: EstimateDoc = Field(description="share of prompts whose answer token beats the wrong answer's "
                                      "at the first token through the API (Wilson CI)")
    undetermined: int = Field(description="prompts where neither token was in the top k (counted wrong)")
    whitebox_accuracy: float | None = Field(description="the white-box run's accuracy on the same prompts "
                                            "(baseline.json per_prompt: clean metric > 0)")
    agreement: float | None = Field(description="share of prompts where API and white-box decisions agree")
    max_abs_score_diff: float | None = Field(description="logit_diff tasks, prompts with both tokens in the top k: "
                                             "max |API log-prob difference - white-box logit difference|")
    same_model: bool = Field(description="the endpoint's model name is the run's model (side by side is meaningful)")


class AuditSummary(VersionedDocument):
    """The audit of one endpoint: where, when, what was asked, and every metric with its CI."""

    stage: Literal["audit"]
    run: str
    base_url: str
    model: str = Field(description="the model name the endpoint was asked for")
    run_model: str = Field(description="the run's white-box model (model.name)")
    api: Literal["chat", "completions"]
    config: dict
    config_hash: str
    started_at: str = Field(description="UTC start of this job (a resumed audit's first job started earlier)")
    finished_at: str
    first_answer_at: str | None = Field(description="UTC start of the earliest answered request the scores rest on")
    last_answer_at: str | None = Field(description="UTC start of the latest answered request the scores rest on")
    n_requests: int = Field(description="requests the scores rest on (lines of responses.jsonl)")
    n_sent: int = Field(description="requests sent over the wire by this job (retries and GET /models included)")
    n_from_store: int = Field(description="answers taken from the response store of an earlier, interrupted try")
    responses_sha256: str
    logprobs: bool = Field(description="the endpoint returned logprobs")
    probes: list[ProbeResult]
    whitebox: list[WhiteboxResult]
    notes: list[str]
