"""Typed config of the model group (`config/model/<name>.yaml`).

`workflow/schemas/config/model.schema.json` is generated from `ModelConfig`. Its class defaults are
the only defaults of the model settings: code that reads a `model` group goes through
`ModelConfig.from_dict` (or receives a `ModelConfig`), never `model_cfg.get(key, default)`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool, StrictInt, StrictStr

from mechflow.config import GroupConfig, config_model


@config_model("model")
class ModelConfig(GroupConfig):
    """The model every stage of a run loads (`mechflow.models.load_model_from_cfg`)."""

    name: StrictStr = Field(min_length=1, description="an embedded model (smollm2_135m, gemma3_270m), a "
                            "TransformerLens/HF hub name (online only), or a local directory holding a "
                            "transformers config.json, weights and tokenizer (offline)")
    backend: Literal["auto", "transformer_lens", "hf"] = Field(
        "auto", description="how the model is run: transformer_lens (HookedTransformer; every stage), hf (plain "
        "PyTorch forward hooks on the Hugging Face model: corpus, harvest, dictionary training and metrics only; "
        "docs/models.md), or auto (transformer_lens for the embedded models and names TransformerLens knows, "
        "hf for a local directory or an architecture TransformerLens lacks)")
    hf_modules: dict[StrictStr, StrictStr] | None = Field(
        None, description="backend hf only: module paths when introspection fails; keys layers (the decoder "
        "layers' ModuleList, e.g. model.layers), mlp (a layer's MLP child, e.g. mlp), embed, final_norm")
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = Field(
        "float32", description="weight dtype on CPU; float32 is the tested default")
    prepend_bos: StrictBool = Field(True, description="start every prompt and corpus context with the BOS token")
    edge_circuits: StrictBool = Field(True, description="whether edge-level circuits (MIB graph) are defined for "
                                      "this model; false: node-level circuits only")
    bos_token: StrictStr | None = Field(None, description="BOS token string; null = the tokenizer's own")
    n_layers: StrictInt | None = Field(None, ge=1, description="layers of the model, for stages that plan one job "
                                       "per layer before the model is loaded (transcoder_set.layers: all); "
                                       "checked against the loaded model")
    d_model: StrictInt | None = Field(None, ge=1, description="residual-stream width, so a dictionary's d_in is "
                                      "checked when the config is composed; checked against the loaded model")
    d_mlp: StrictInt | None = Field(None, ge=1, description="MLP hidden width (hook_pre / hook_post), as d_model")
    n_ctx: StrictInt | None = Field(None, ge=1, description="context length (TransformerLens n_ctx): prepare_task "
                                    "refuses longer prompts; checked against the loaded model")
