"""Typed view of the `harvest` config group (config/harvest/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mechflow.contracts.parquet import ACTIVATION_DTYPES
from mechflow.errors import ConfigError, check_known_keys

# Short names for the per-layer hook points; expanded by `mechflow.harvest.hooks.expand_hooks`.
HOOK_POINTS: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    # What the MLP reads: the ln2-normalised residual. mechflow loads models with fold_ln, so the
    # norm weight lives in W_in/W_gate and this is exactly the MLP's input (transcoders read it).
    "mlp_in": "blocks.{layer}.ln2.hook_normalized",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "attn_out": "blocks.{layer}.hook_attn_out",
}


@dataclass(frozen=True)
class HarvestConfig:
    """See workflow/schemas/config/harvest.schema.json for each key's meaning."""

    layers: tuple[int, ...] = ()
    hook_points: tuple[str, ...] = ("resid_post",)
    hooks: tuple[str, ...] = ()
    batch_size: int = 8
    shard_rows: int = 65536
    row_group_rows: int = 8192
    dtype: str = "float32"
    compression_level: int = 3
    max_contexts: int | None = None
    progress: bool = True

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "HarvestConfig":
        check_known_keys("harvest", cfg, cls)
        values = dict(cfg)
        for key in ("layers", "hook_points", "hooks"):
            if key in values:
                v = values[key]
                values[key] = (v,) if isinstance(v, (str, int)) else tuple(v or ())
        out = cls(**values)
        out.validate()
        return out

    def validate(self) -> None:
        def positive(key: str) -> None:
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"harvest.{key}={v!r} must be a positive integer")

        for key in ("batch_size", "shard_rows", "row_group_rows"):
            positive(key)
        if self.max_contexts is not None:
            positive("max_contexts")
        if self.dtype not in ACTIVATION_DTYPES:
            raise ConfigError(f"harvest.dtype={self.dtype!r} is not one of {sorted(ACTIVATION_DTYPES)}")
        if not isinstance(self.compression_level, int) or not 1 <= self.compression_level <= 22:
            raise ConfigError(f"harvest.compression_level={self.compression_level!r} must be a zstd level in 1..22")
        bad = [p for p in self.hook_points if p not in HOOK_POINTS]
        if bad:
            raise ConfigError(f"harvest.hook_points: {bad[0]!r} is not one of {list(HOOK_POINTS)}; "
                              f"for any other TransformerLens hook use harvest.hooks")
        if any(not isinstance(layer, int) or isinstance(layer, bool) for layer in self.layers):
            raise ConfigError(f"harvest.layers={list(self.layers)!r} must be a list of integers")
        if self.layers and not self.hook_points:
            raise ConfigError("harvest.hook_points is empty but harvest.layers is set; add e.g. resid_post")
        if not (self.layers and self.hook_points) and not self.hooks:
            raise ConfigError("harvest: no hooks selected; set harvest.layers + harvest.hook_points "
                              "(e.g. layers: [6], hook_points: [resid_post]) or harvest.hooks")
