"""Test helper: write activation shards + `_manifest.json` in the harvest layout (contracts only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mechflow.contracts.filenames import CORPUS_TOKENS, SHARD_MANIFEST, SHARD_PATTERN
from mechflow.contracts.models import HarvestManifest, ShardInfo
from mechflow.contracts.parquet import CORPUS_SCHEMA, activations_schema
from mechflow.io import sha256_file


def write_shards(folder: Path, acts: np.ndarray, *, hook: str = "blocks.0.hook_resid_post",
                 prepend_bos: bool = True, contexts_per_shard: int = 4, row_group_rows: int = 64,
                 tokens: np.ndarray | None = None, model: str = "test_model", dtype: str = "float32",
                 corpus_sha256: str = "0" * 64) -> Path:
    """Write `acts` (``[n_contexts, context_size, d]``) as shards of whole contexts; return the manifest.

    `corpus_sha256`: the sha256 of the corpus `tokens.parquet` the manifest claims to come from.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_ctx, T, d = acts.shape
    if tokens is None:
        tokens = np.arange(n_ctx * T, dtype=np.int32).reshape(n_ctx, T) % 50
    schema = activations_schema(d, dtype)
    shards = []
    for si, c0 in enumerate(range(0, n_ctx, contexts_per_shard)):
        c1 = min(n_ctx, c0 + contexts_per_shard)
        ctx = np.repeat(np.arange(c0, c1, dtype=np.int64), T)
        pos = np.tile(np.arange(T, dtype=np.int32), c1 - c0)
        flat = acts[c0:c1].reshape(-1, d)
        if dtype == "float16":
            values = pa.array(flat.astype(np.float16).reshape(-1), type=pa.float16())
        else:
            values = pa.array(flat.astype(np.float32).reshape(-1), type=pa.float32())
        table = pa.table({
            "context_id": pa.array(ctx), "position": pa.array(pos),
            "token_id": pa.array(tokens[c0:c1].reshape(-1).astype(np.int32)),
            "activation": pa.FixedSizeListArray.from_arrays(values, d),
        }, schema=schema)
        name = SHARD_PATTERN.format(index=si)
        pq.write_table(table, folder / name, row_group_size=row_group_rows)
        shards.append(ShardInfo(file=name, rows=table.num_rows, sha256=sha256_file(folder / name),
                                first_context=c0, last_context=c1 - 1))
    manifest = HarvestManifest(model=model, model_sha256=None, hook=hook, layer=0, d=d, dtype=dtype,
                               context_size=T, prepend_bos=prepend_bos, corpus_sha256=corpus_sha256,
                               n_contexts=n_ctx, n_rows=n_ctx * T, shards=shards, config_hash="test")
    (folder / SHARD_MANIFEST).write_text(manifest.model_dump_json(indent=2))
    return folder / SHARD_MANIFEST


def write_tokens(folder: Path, tokens: np.ndarray) -> Path:
    """Corpus `tokens.parquet` (context_id, tokens) for ``[n_contexts, T]`` token ids."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"context_id": pa.array(np.arange(len(tokens), dtype=np.int64)),
                      "tokens": pa.array([list(map(int, r)) for r in tokens], type=pa.list_(pa.int32()))},
                     schema=CORPUS_SCHEMA)
    pq.write_table(table, folder / CORPUS_TOKENS)
    return folder / CORPUS_TOKENS
