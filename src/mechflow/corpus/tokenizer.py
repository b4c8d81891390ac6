"""Load only a model's tokenizer (seconds), not the whole model (≈20 s for SmolLM2)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mechflow.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerInfo:
    """A Hugging Face tokenizer plus the ids the corpus packer needs."""

    tokenizer: Any
    name: str
    bos_token_id: int | None
    eos_token_id: int | None

    def separator_id(self, separator: str, prepend_bos: bool) -> int:
        """Token put between documents: `bos` (default; falls back to EOS without BOS) or `eos`."""
        if separator == "bos" and prepend_bos and self.bos_token_id is not None:
            return self.bos_token_id
        for candidate in (self.eos_token_id, self.bos_token_id):
            if candidate is not None:
                return candidate
        raise ConfigError(f"corpus.separator={separator!r}: the tokenizer of {self.name!r} has neither EOS nor BOS")


def load_tokenizer(model_cfg: dict) -> TokenizerInfo:
    """The tokenizer of `model_cfg["name"]` with the BOS id of mechflow's convention.

    Uses ``mechflow.models.load_tokenizer`` (GGUF tokenizer for embedded models, hub otherwise) and
    ``mechflow.models.resolve_bos_id`` (``model.bos_token`` when set, else the tokenizer's BOS), so the
    ids match ``LoadedModel.to_tokens`` exactly.
    """
    from mechflow.models import ModelConfig, resolve_bos_id
    from mechflow.models import load_tokenizer as load_model_tokenizer

    name = model_cfg["name"]
    tokenizer = load_model_tokenizer(name)
    bos_id = resolve_bos_id(tokenizer, name, model_cfg.get("bos_token"))
    if ModelConfig.from_dict(model_cfg).prepend_bos and bos_id is None:
        raise ModelLoadError(f"model.prepend_bos is set but {name!r} has no BOS token; set model.bos_token")
    log.info("tokenizer of %s loaded (bos=%s, eos=%s)", name, bos_id, tokenizer.eos_token_id)
    return TokenizerInfo(tokenizer=tokenizer, name=name, bos_token_id=bos_id, eos_token_id=tokenizer.eos_token_id)
