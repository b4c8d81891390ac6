"""Load only a model's tokenizer (seconds), not the whole model (≈20 s for SmolLM2)."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from mechflow.errors import ModelLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerInfo:
    """A Hugging Face tokenizer plus the ids the corpus packer needs."""

    tokenizer: Any
    name: str
    bos_token_id: int | None
    separator_token_id: int


def _embedded_gguf_paths() -> dict:
    from mechflow.models.registry import EMBEDDED_MODELS

    return {name: entry.gguf_path for name, entry in EMBEDDED_MODELS.items()}


@functools.lru_cache(maxsize=4)
def _load_hf_tokenizer(name: str) -> tuple[Any, str]:
    from transformers import AutoTokenizer

    gguf = _embedded_gguf_paths().get(name)
    if gguf is not None:
        path = gguf()
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), str(path)
    from mechflow.models.registry import _hub_offline

    if _hub_offline():
        raise ModelLoadError(f"model {name!r} is not embedded and the hub is offline; use model=smollm2_135m or model=gemma3_270m")
    try:
        return AutoTokenizer.from_pretrained(name), name
    except Exception as exc:  # network errors come in many types
        raise ModelLoadError(f"tokenizer of {name!r} could not be loaded ({type(exc).__name__}: {exc})") from exc


def load_tokenizer(model_cfg: dict) -> TokenizerInfo:
    """The tokenizer of `model_cfg["name"]`, with the BOS id of mechflow's convention.

    The BOS id follows ``mechflow.models.load_model``: ``model_cfg["bos_token"]`` when set, else the
    tokenizer's own BOS. Documents are separated by the tokenizer's EOS token (its BOS when it has
    no EOS).
    """
    name = model_cfg["name"]
    tokenizer, source = _load_hf_tokenizer(name)
    bos_token = model_cfg.get("bos_token")
    if bos_token is not None:
        bos_id = tokenizer.convert_tokens_to_ids(bos_token)
        if bos_id is None or bos_id == tokenizer.unk_token_id:
            raise ModelLoadError(f"model.bos_token={bos_token!r} is not a token of {name}'s vocabulary")
    else:
        bos_id = tokenizer.bos_token_id
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if sep is None:
        raise ModelLoadError(f"tokenizer of {name!r} has neither an EOS nor a BOS token to separate documents")
    log.info("tokenizer of %s loaded from %s (bos=%s, separator=%s)", name, source, bos_id, sep)
    return TokenizerInfo(tokenizer=tokenizer, name=name, bos_token_id=bos_id, separator_token_id=int(sep))
