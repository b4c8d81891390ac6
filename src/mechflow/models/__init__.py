"""Model registry: embedded offline models and hub names, loaded into TransformerLens."""

from mechflow.models.config import ModelConfig
from mechflow.models.registry import (
    EMBEDDED_MODELS,
    LoadedModel,
    encode,
    load_hf_reference,
    load_model,
    load_model_from_cfg,
    load_tokenizer,
    model_card,
    resolve_bos_id,
)

__all__ = ["EMBEDDED_MODELS", "LoadedModel", "ModelConfig", "encode", "load_model", "load_model_from_cfg",
           "load_hf_reference", "load_tokenizer", "resolve_bos_id", "model_card"]
