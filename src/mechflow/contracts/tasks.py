"""Task files: the user JSONL line, ``dataset.jsonl`` / ``dataset.meta.json`` and ``baseline.json``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mechflow.contracts.documents import Document, VersionedDocument

TaskMetric = Literal["logit_diff", "prob_diff"]


class TaskExample(Document):
    """One line of a user task JSONL file (mechflow.contracts.TaskExample). Answers are single next
    tokens for the model's tokenizer (include the leading space, e.g. " Paris"); prompt and
    corrupted_prompt must tokenize to the same number of tokens."""

    id: int | str | None = Field(None, description="unique example id; default: the line number")
    prompt: str = Field(description="clean prompt; the answer is its next token")
    corrupted_prompt: str = Field(description="counterfactual prompt of the same token length (patching source)")
    answer: str = Field(description="correct next token on the clean prompt, leading space included")
    wrong_answer: str = Field(description="contrast token (e.g. the answer of the corrupted prompt); the metric is "
                                          "logit(answer) - logit(wrong_answer)")
    template: str | None = Field(None, description="optional template/group label, kept for per-template analyses")


class TaskDatasetRow(Document):
    """One line of ``dataset.jsonl``: the example plus the token ids the model sees."""

    id: int | str = Field(description="example id (unique within the dataset)")
    prompt: str
    corrupted_prompt: str
    answer: str
    wrong_answer: str
    template: str | None
    clean_ids: list[int] = Field(description="clean prompt ids, BOS included per the model convention")
    corrupted_ids: list[int] = Field(description="corrupted prompt ids, same length as clean_ids")
    answer_id: int
    wrong_id: int
    good_ids: list[int] = Field(description="tokens whose logit/probability the metric adds")
    bad_ids: list[int] = Field(description="tokens whose logit/probability the metric subtracts")


class TokenizerDescription(Document):
    """The tokenizer a dataset was built with (readers compare ``model``, ``prepend_bos`` and
    ``bos_token_id`` with the model card; ``prepare_task`` writes every field)."""

    model: str = Field(description="model config name the dataset was tokenized for")
    tokenizer_class: str | None = None
    vocab_size: int | None = None
    prepend_bos: bool | None = None
    bos_token_id: int | None = Field(None, description="BOS id when prepended, else null")
    bos_token: str | None = None


class TaskDatasetMeta(VersionedDocument):
    """``dataset.meta.json``: dataset-level facts of a ``dataset.jsonl`` (written by ``prepare_task``).

    ``config`` .. ``details`` are optional: `mechflow.tasks.write_dataset` also writes datasets
    from a bare ``{task, kind, metric}`` (readers treat absent ``posable`` as true).
    """

    task: str = Field(description="task name (config key)")
    kind: str = Field(description="builder: ioi | factual_recall | greater_than | jsonl")
    metric: TaskMetric
    config: dict | None = Field(None, description="the task config the dataset was built from")
    config_hash: str | None = None
    tokenizer: TokenizerDescription | None = None
    posable: bool = Field(True, description="false: the task cannot be posed with this tokenizer (no examples)")
    reason: str | None = Field(None, description="why the task cannot be posed")
    details: dict | None = Field(None, description="filter statistics and design choices of the builder")
    n_examples: int
    token_lengths: list[int] = Field(description="distinct prompt lengths in tokens, ascending")
    dataset_sha256: str = Field(description="sha256 of dataset.jsonl")


class PromptBaseline(Document):
    id: int | str
    clean: float = Field(description="task metric on the clean prompt")
    corrupted: float = Field(description="task metric on the corrupted prompt")


class TaskBaseline(VersionedDocument):
    """``baseline.json``: the model's task metric on its dataset and the verdict (``evaluate_task``).

    A task that cannot be posed has ``n_prompts`` 0, null statistics and no ``clean_metric_std``,
    ``corrupted_accuracy``, ``clean_beats_corrupted``.
    """

    task: str
    kind: str
    metric: TaskMetric
    model: str
    config_hash: str
    dataset_sha256: str
    meta_sha256: str
    n_prompts: int
    clean_metric_mean: float | None
    corrupted_metric_mean: float | None
    clean_metric_std: float | None = None
    accuracy: float | None
    chance_accuracy: float | None
    chance_metric_mean: float | None
    corrupted_accuracy: float | None = None
    clean_beats_corrupted: float | None = None
    p_value_accuracy: float | None
    p_value_clean_vs_corrupted: float | None
    verdict: str
    per_prompt: list[PromptBaseline]
