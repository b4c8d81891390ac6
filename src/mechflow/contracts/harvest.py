"""Harvest files: ``index.json``, each hook's ``_manifest.json`` and the shard sidecars.

The shards themselves are Parquet tables (`mechflow.contracts.parquet.activations_schema`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mechflow.contracts.documents import Document, VersionedDocument


class ShardInfo(Document):
    file: str
    rows: int
    sha256: str
    first_context: int
    last_context: int


class HarvestManifest(VersionedDocument):
    """`_manifest.json` of one (model, hook) shard folder."""

    model: str
    model_sha256: str | None
    hook: str
    layer: int | None
    d: int = Field(description="width of the activation vector (d_model, d_mlp, n_heads*d_head...)")
    dtype: str
    context_size: int
    prepend_bos: bool
    corpus_sha256: str
    n_contexts: int
    n_rows: int
    shards: list[ShardInfo]
    config_hash: str
    backend: Literal["transformer_lens", "hf"] = Field(
        "transformer_lens", description="how the activations were read: TransformerLens hook points, or forward "
        "hooks on the Hugging Face model (docs/models.md; its mlp_in includes the norm weight)")
    hook_module: str | None = Field(None, description="backend hf: the HF module the hook reads and whether its "
                                    "input or output, e.g. 'model.layers.3.mlp (input)'; null for transformer_lens")


class ShardSidecar(Document):
    """``_part-NNNNN.json`` beside each shard: resume state (the shard counts as complete when its
    plan key matches the current run and the file's sha256 matches)."""

    shard: ShardInfo
    d: int = Field(description="activation width of the shard")
    plan_key: str = Field(description="hash of everything that changes the shard's bytes")


class HarvestIndexEntry(Document):
    hook: str = Field(description="TransformerLens hook name")
    layer: int | None = Field(description="block index of a blocks.{l}.* hook, else null")
    d: int
    n_rows: int
    n_shards: int
    manifest: str = Field(description="the hook's _manifest.json, relative to harvest_dir")
    sha256: str = Field(description="sha256 of that manifest")


class HarvestIndex(VersionedDocument):
    """``harvest/index.json``: every harvested hook's manifest (written last by the harvest stage)."""

    model: str
    model_sha256: str | None
    corpus_sha256: str
    n_contexts: int
    context_size: int
    harvest_dir: str = Field(description="the hook folders' parent, relative to this file")
    hooks: list[HarvestIndexEntry]
    backend: Literal["transformer_lens", "hf"] = Field(
        "transformer_lens", description="TransformerLens hook points, or forward hooks on the Hugging Face model")
    hook_modules: dict[str, str] | None = Field(
        None, description="backend hf: each harvested TL hook name -> 'HF module path (input|output)'")
