"""Step 1 of cross-model feature matching: the texts both models read, and how each model's tokens
meet at their words.

Shared texts are the union of both runs' task prompts (each task's prompts of A, then B's that A
lacks; a seeded sample of whole prompts up to `task_words` words) and corpus passages of at most
`passage_words` words, one in every `passage_stride`, from the start of the corpus stream (the text
the SAEs were trained on) up to `corpus_words` words. A word is a maximal run of non-space
characters; each model reads every text with its own tokenizer and BOS convention, and a token
belongs to every word its character span (the fast tokenizer's offset mapping) overlaps.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mechflow.errors import ConfigError, DataError

_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class SharedTexts:
    """The texts both models read, in row order.

    Attributes:
        texts: task prompts first, then corpus passages.
        sources: per text, "task:<name>" or "corpus".
        n_prompts_available: distinct task prompts in the union before the word budget.
    """

    texts: list[str]
    sources: list[str]
    n_prompts_available: int


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the words (maximal runs of non-space characters) of `text`."""
    return [m.span() for m in _WORD.finditer(text)]


def _as_paths(paths: Sequence[Path] | Path | str | None) -> list[Path]:
    if paths is None:
        return []
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def task_prompt_union(datasets_a: Sequence[Path] | Path | None, datasets_b: Sequence[Path] | Path | None
                      ) -> list[tuple[str, str]]:
    """(task, prompt) of both runs' datasets: per task, A's prompts then B's that A lacks.

    Tasks are matched by folder name (`results/<run>/tasks/<task>/dataset.jsonl`); the union, not
    the intersection, since task builders keep only single-token names, so different tokenizers
    draw different prompts (as in `stage.cka_prompt_texts`).
    """
    from mechflow.tasks.dataset import TaskDataset

    by_task: dict[str, dict[str, None]] = {}
    for path in [*_as_paths(datasets_a), *_as_paths(datasets_b)]:
        prompts = by_task.setdefault(path.parent.name, {})
        prompts.update(dict.fromkeys(it.prompt for it in TaskDataset.load(path).examples))
    return [(task, p) for task in sorted(by_task) for p in by_task[task]]


def corpus_passages(documents: Iterable[str], *, max_words: int, passage_words: int, stride: int = 1
                    ) -> list[str]:
    """Every `stride`-th passage of at most `passage_words` words of `documents`, `max_words` words in all.

    A stride > 1 spreads the passages over more documents (topics) of the stream's start.
    """
    out: list[str] = []
    left, n = max_words, 0
    for doc in documents:
        spans = word_spans(doc)
        for s in range(0, len(spans), passage_words):
            if left <= 0:
                return out
            n += 1
            if (n - 1) % stride:
                continue
            chunk = spans[s:s + min(passage_words, left)]
            out.append(doc[chunk[0][0]:chunk[-1][1]])
            left -= len(chunk)
    return out


def shared_texts(datasets_a: Sequence[Path] | Path | None, datasets_b: Sequence[Path] | Path | None,
                 corpus_cfg: Mapping[str, Any] | None, *, task_words: int, corpus_words: int,
                 passage_words: int, seed: int, stride: int = 1) -> SharedTexts:
    """Module step 1: a seeded sample of whole task prompts, then the first corpus passages."""
    prompts = task_prompt_union(datasets_a, datasets_b)
    order = np.random.default_rng(seed).permutation(len(prompts))
    texts, sources, used = [], [], 0
    for i in order:
        task, prompt = prompts[i]
        n = len(word_spans(prompt))
        if used + n > task_words:
            continue
        texts.append(prompt)
        sources.append(f"task:{task}")
        used += n
    if corpus_cfg is not None and corpus_words > 0:
        from mechflow.corpus.config import CorpusConfig
        from mechflow.corpus.core import iter_documents

        passages = corpus_passages(iter_documents(CorpusConfig.from_dict(dict(corpus_cfg))),
                                   max_words=corpus_words, passage_words=passage_words, stride=stride)
        texts += passages
        sources += ["corpus"] * len(passages)
    if not texts:
        raise DataError("feature matching: no shared texts (no task prompt fits task_words and no corpus "
                        "passage); select tasks or give the corpus config")
    return SharedTexts(texts, sources, len(prompts))



@dataclass(frozen=True)
class ModelSide:
    """One model of the pair as the stage reads it.

    Attributes:
        name: the model's config name (checked against the SAE's `training.json`).
        model: a HookedTransformer.
        tokenizer: a fast tokenizer: ``tokenizer(text, add_special_tokens=False,
            return_offsets_mapping=True)`` and ``convert_ids_to_tokens(ids)``.
        prepend_bos / bos_token_id: the model's BOS convention.
    """

    name: str
    model: Any
    tokenizer: Any
    prepend_bos: bool
    bos_token_id: int | None

    @classmethod
    def load(cls, model_cfg: Mapping[str, Any]) -> ModelSide:
        from mechflow.models import load_model_from_cfg

        loaded = load_model_from_cfg(dict(model_cfg))
        return cls(loaded.card.name, loaded.model, loaded.tokenizer, loaded.card.prepend_bos,
                   loaded.card.bos_token_id)


@dataclass(frozen=True)
class Tokenized:
    """One text for one model: token ids (BOS first when the model prepends it) and the
    (word, token) pairs whose spans overlap; token indices count the text's tokens, BOS excluded."""

    ids: list[int]
    word: np.ndarray
    token: np.ndarray


def tokenize_words(side: ModelSide, text: str, spans: Sequence[tuple[int, int]]) -> Tokenized:
    """Tokenize `text` with the model's convention and map its tokens to the words of `spans`."""
    try:
        enc = side.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:  # slow (Python) tokenizers have no offset mapping
        raise ConfigError(f"feature matching needs a fast tokenizer (offset mapping) for {side.name}: {exc}") from exc
    ids = list(enc["input_ids"])
    off = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    if len(off) != len(ids):
        raise DataError(f"{side.name} tokenizer returned {len(off)} offsets for {len(ids)} tokens of {text[:40]!r}")
    s = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    overlap = ((off[None, :, 0] < s[:, None, 1]) & (off[None, :, 1] > s[:, None, 0])
               & (off[None, :, 1] > off[None, :, 0]))
    word, token = np.nonzero(overlap)
    if side.prepend_bos:
        if side.bos_token_id is None:
            raise ConfigError(f"model.prepend_bos is set but {side.name} has no BOS token id")
        ids = [int(side.bos_token_id), *ids]
    return Tokenized(ids, word, token)
