"""Tokenizer access for task building: the model's BOS convention without loading its weights.

Task datasets are token-exact: every prompt is stored with the ids the model will see, so the
BOS convention (``model.prepend_bos``, ``model.bos_token``) is resolved here exactly as
:func:`mechflow.models.load_model` resolves it, and :func:`evaluate_task` checks that the loaded
model agrees.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mechflow.errors import ConfigError, ModelLoadError
from mechflow.models import ModelConfig, encode, load_tokenizer, resolve_bos_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskTokenizer:
    """A tokenizer plus the BOS convention of one model config.

    Attributes:
        tokenizer: the Hugging Face tokenizer.
        model_name: the model config's ``name``.
        prepend_bos: whether prompts start with ``bos_token_id``.
        bos_token_id: id prepended when ``prepend_bos`` (None when the model has none).
    """

    tokenizer: Any
    model_name: str
    prepend_bos: bool
    bos_token_id: int | None

    @classmethod
    def from_model_cfg(cls, model_cfg: ModelConfig | Mapping[str, Any], tokenizer: Any | None = None
                       ) -> "TaskTokenizer":
        """Resolve the BOS convention of `model_cfg` as ``load_model`` does (missing keys: the
        `ModelConfig` class defaults)."""
        mcfg = ModelConfig.from_dict(model_cfg)
        name, prepend = mcfg.name, mcfg.prepend_bos
        tok = load_tokenizer(name) if tokenizer is None else tokenizer
        try:
            bos_id = resolve_bos_id(tok, name, mcfg.bos_token)
        except ModelLoadError as exc:
            raise ConfigError(str(exc)) from exc
        if prepend and bos_id is None:
            raise ConfigError(f"model.prepend_bos is true but {name}'s tokenizer has no BOS; set model.bos_token")
        return cls(tokenizer=tok, model_name=name, prepend_bos=prepend, bos_token_id=bos_id)

    def encode(self, text: str) -> list[int]:
        """Ids of a prompt as the model sees it (BOS first when the convention asks for it)."""
        return encode(self.tokenizer, text, self.prepend_bos, self.bos_token_id)

    def raw(self, text: str) -> list[int]:
        """Ids of `text` alone: no BOS, no special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def single_token(self, text: str) -> int | None:
        """The id of `text` if it encodes to exactly one token, else None.

        Pass the text as it appears in context, e.g. ``" Mary"`` with its leading space.
        """
        ids = self.raw(text)
        return ids[0] if len(ids) == 1 else None

    def continues_as(self, prompt: str, continuation: str) -> int | None:
        """The single id that `continuation` adds after `prompt`, or None.

        None unless tokenizing ``prompt + continuation`` equals tokenizing ``prompt`` followed by
        exactly one token (merges across the boundary would make the next-token target wrong).
        """
        head = self.raw(prompt)
        full = self.raw(prompt + continuation)
        if len(full) != len(head) + 1 or full[: len(head)] != head:
            return None
        return full[-1]

    def describe(self) -> dict:
        """Tokenizer facts recorded in the dataset's sidecar metadata."""
        return {
            "model": self.model_name,
            "tokenizer_class": type(self.tokenizer).__name__,
            "vocab_size": len(self.tokenizer),
            "prepend_bos": self.prepend_bos,
            "bos_token_id": self.bos_token_id if self.prepend_bos else None,
            "bos_token": self.tokenizer.convert_ids_to_tokens(self.bos_token_id)
            if (self.prepend_bos and self.bos_token_id is not None)
            else None,
        }
