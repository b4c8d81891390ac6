"""Typed config of the harvest stage (Hydra group ``harvest``, `config/harvest/*.yaml`).

`workflow/schemas/config/harvest.schema.json` is generated from `HarvestConfig`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StrictBool, StrictInt, StrictStr, model_validator

from mechflow.config import FieldError, GroupConfig, config_model
from mechflow.contracts.hooks import HOOK_POINTS
from mechflow.contracts.parquet import ACTIVATION_DTYPES

HookPoint = Literal[tuple(HOOK_POINTS)]  # type: ignore[valid-type]
ActivationDtype = Literal[tuple(ACTIVATION_DTYPES)]  # type: ignore[valid-type]


@config_model("harvest")
class HarvestConfig(GroupConfig):
    """Which activations to store and how."""

    layers: tuple[Annotated[StrictInt, Field(ge=0)], ...] = Field(
        (), description="Block indices; each is combined with every hook_points entry.")
    hook_points: tuple[HookPoint, ...] = Field(
        ("resid_post",), description="Per-layer hook points: resid_pre/mid/post = blocks.L.hook_resid_*, mlp_in = "
        "blocks.L.ln2.hook_normalized (what the MLP reads, fold_ln), mlp_out = blocks.L.hook_mlp_out, attn_out = "
        "blocks.L.hook_attn_out; for any other TransformerLens hook use harvest.hooks.")
    hooks: tuple[StrictStr, ...] = Field(
        (), description="Extra TransformerLens hook names (per-position hooks only; trailing dims are flattened).")
    batch_size: StrictInt = Field(8, ge=1, description="Contexts per forward pass.")
    shard_rows: StrictInt = Field(12800, ge=1, description="Max rows (tokens) per shard; shards hold whole contexts, "
                                  "so must be >= context_size. 12800 = 100 contexts of 128 tokens, about 30 MB at "
                                  "d_model 576 in float32.")
    row_group_rows: StrictInt = Field(4096, ge=1, description="Parquet row group size; readers stream one row "
                                      "group at a time.")
    dtype: ActivationDtype = Field("float32", description="Stored activation dtype (bfloat16 stored as uint16 bit "
                                   "patterns).")
    compression_level: StrictInt = Field(3, ge=1, le=22, description="zstd compression level.")
    max_contexts: StrictInt | None = Field(None, ge=1, description="Harvest only the first N contexts of the corpus "
                                           "(null: all).")
    progress: StrictBool = Field(True, description="Show a tqdm progress bar (tokens/s).")

    @model_validator(mode="after")
    def _some_hook_selected(self) -> HarvestConfig:
        if self.layers and not self.hook_points:
            raise FieldError("hook_points", "is empty but harvest.layers is set; add e.g. resid_post")
        if not (self.layers and self.hook_points) and not self.hooks:
            raise FieldError("layers", "and harvest.hooks select no hook; set harvest.layers + harvest.hook_points "
                             "(e.g. layers: [6], hook_points: [resid_post]) or harvest.hooks")
        return self
