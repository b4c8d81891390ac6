"""What the ``analyze`` and ``causal_trace`` stages share: the model they run, Parquet tables read
through their contracts (written by `mechflow.contracts.parquet.write_table`), figures written atomically."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from mechflow.contracts.parquet import schema_mismatches
from mechflow.errors import ConfigError, DataError
from mechflow.models.config import ModelConfig
from mechflow.plotting import save_figure as _save_figure


def read_table(path: Path, contract: pa.Schema, rule: str) -> pl.DataFrame:
    """The table at `path`, checked against `contract`; DataError naming the rule that rewrites it."""
    problems = schema_mismatches(pq.read_schema(path), contract)
    if problems:
        raise DataError(f"{path} does not match its contract (mechflow.contracts.parquet): " + "; ".join(problems)
                        + f"; re-run rule {rule}")
    return pl.read_parquet(path)


def resolve_model(model_cfg: ModelConfig | Mapping[str, Any], loaded_model: Any) -> tuple[Any, Any, str]:
    """(HookedTransformer, tokenizer or None, display name) from a LoadedModel, a bare model or the config."""
    from mechflow.models import LoadedModel, load_model_from_cfg

    name = ModelConfig.from_dict(model_cfg).name
    if loaded_model is None:
        loaded_model = load_model_from_cfg(model_cfg)
    if isinstance(loaded_model, LoadedModel):
        return loaded_model.model, loaded_model.tokenizer, name
    return loaded_model, getattr(loaded_model, "tokenizer", None), name


def save_figure(fig, path: Path) -> None:
    """The attribution stages' figures: 120 dpi, tight, closed after saving."""
    import matplotlib.pyplot as plt

    _save_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def optional_path(value: Path | list | None) -> Path | None:
    """An optional rule input (Snakemake passes an empty list when absent) as a path or None."""
    if isinstance(value, (list, tuple)):
        if len(value) > 1:
            raise ConfigError(f"expected at most one file, got {value}")
        value = value[0] if value else None
    return None if value is None else Path(value)
