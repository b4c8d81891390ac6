"""Helpers shared by the harvest tests (a unique module name: tests/ has no packages)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mechflow.corpus import contexts_table
from mechflow.harvest import harvest

BOS = 1
MODEL_CFG = {"name": "tiny_llama", "prepend_bos": True}


def write_tokens(path: Path, n_contexts: int = 10, context_size: int = 12, d_vocab: int = 50,
                 seed: int = 0) -> np.ndarray:
    """A random corpus for the tiny model (BOS first, like the corpus stage writes)."""
    rng = np.random.default_rng(seed)
    ctx = rng.integers(0, d_vocab, (n_contexts, context_size))
    ctx[:, 0] = BOS
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(contexts_table(ctx), path)
    return ctx


def run(tmp_path: Path, tokens: Path, model, **cfg) -> dict:
    """Harvest `tokens` with small shards (36 rows = 3 contexts) into tmp_path/out."""
    base = {"layers": [0, 1], "hook_points": ["resid_post"], "batch_size": 3, "shard_rows": 36,
            "row_group_rows": 10, "progress": False}
    return harvest({**base, **cfg}, model_cfg=MODEL_CFG, tokens=tokens, index=tmp_path / "out" / "index.json",
                   harvest_dir=tmp_path / "out" / "shards", loaded_model=model)
