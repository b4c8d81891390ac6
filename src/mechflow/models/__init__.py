"""Model registry: embedded offline models, hub names and local directories, loaded into TransformerLens
(or, for architectures it lacks, run through forward hooks on the Hugging Face model: `HookedHF`)."""

from mechflow.models.config import ModelConfig
from mechflow.models.hf import HookedHF
from mechflow.models.registry import (
    ANY_BACKEND,
    EMBEDDED_MODELS,
    TL_ONLY,
    LoadedModel,
    encode,
    load_hf_reference,
    load_model,
    load_model_from_cfg,
    load_tokenizer,
    model_card,
    require_backend,
    resolve_backend,
    resolve_bos_id,
)

__all__ = ["ANY_BACKEND", "EMBEDDED_MODELS", "TL_ONLY", "HookedHF", "LoadedModel", "ModelConfig", "encode",
           "load_hf_reference", "load_model", "load_model_from_cfg", "load_tokenizer", "model_card",
           "require_backend", "resolve_backend", "resolve_bos_id"]
