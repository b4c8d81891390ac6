"""Step 5 of the `features` stage: one record per selected latent, and `features.jsonl`.

The selected latents are the top attributed ones plus `n_features` live latents (a seeded random
sample or the most frequent); the windows of their top contexts are read from the corpus
`tokens.parquet` (row batches, only the needed contexts kept) and decoded. Each record (feature,
hook, layer, stats with its histogram, top contexts, logit effects, task attribution) is a
`mechflow.contracts.features.FeatureRecord`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mechflow.contracts.documents import check_document
from mechflow.contracts.features import FeatureRecord
from mechflow.errors import DataError
from mechflow.features.config import FeaturesConfig
from mechflow.features.stats import FeatureStats
from mechflow.io import atomic_write_jsonl


def read_windows(tokens: Path, context_ids: set[int], batch_rows: int = 1024) -> dict[int, list[int]]:
    """Token ids of the wanted contexts of the corpus `tokens.parquet`, reading it in row batches."""
    tokens = Path(tokens)
    if not tokens.exists():
        raise DataError(f"corpus tokens file {tokens} does not exist: re-run the prepare_corpus stage")
    out: dict[int, list[int]] = {}
    if not context_ids:
        return out
    wanted = np.array(sorted(context_ids), dtype=np.int64)
    pf = pq.ParquetFile(tokens)
    for rb in pf.iter_batches(batch_size=batch_rows, columns=["context_id", "tokens"]):
        mask = pc.is_in(rb.column(0), value_set=pc.cast(wanted, rb.column(0).type))
        if not pc.any(mask).as_py():
            continue
        sel = rb.filter(mask)
        for c, t in zip(sel.column(0).to_pylist(), sel.column(1).to_pylist()):
            out[int(c)] = t
    pf.close()
    missing = sorted(context_ids - set(out))
    if missing:
        raise DataError(f"contexts {missing[:5]} of the harvest are not in {tokens}: the corpus and the harvest "
                        "do not match; re-run the harvest on this corpus")
    return out


def token_decoder(tokenizer: Any) -> Callable[[int], str]:
    """id -> text of that one token (cached); `<id>` when no tokenizer is available."""
    cache: dict[int, str] = {}

    def decode(i: int) -> str:
        if i not in cache:
            cache[i] = tokenizer.decode([i]) if tokenizer is not None else f"<{i}>"
        return cache[i]

    return decode


def select_features(stats: FeatureStats, c: FeaturesConfig, always: Sequence[int]) -> list[int]:
    """`always` (the top attributed latents) plus `n_features` live latents (random or most frequent)."""
    live = torch.nonzero(stats.live).flatten().tolist()
    chosen = set(always)
    budget = len(live) if c.n_features is None else max(c.n_features - len(chosen), 0)
    rest = [f for f in live if f not in chosen]
    if c.selection == "frequency":
        rest.sort(key=lambda f: (-int(stats.count[f]), f))
    else:
        rest = [rest[i] for i in np.random.default_rng(c.seed).permutation(len(rest))]
    return sorted(chosen | set(rest[:budget]))


def build_records(stats: FeatureStats, features: Sequence[int], windows: dict[int, list[int]], window: int,
                  decode: Callable[[int], str], logits: dict[int, dict] | None, task_frames: dict[str, pl.DataFrame],
                  base: dict[str, Any]) -> list[dict[str, Any]]:
    """One JSON-ready record per latent (see the module docstring, step 5)."""
    per_task = {t: f.sort("feature") for t, f in task_frames.items() if len(f)}
    records = []
    for f in features:
        contexts = []
        for r, (v, cid, p) in enumerate(stats.top_contexts(f)):
            ids = windows[cid]
            lo, hi = max(0, p - window), min(len(ids), p + window + 1)
            contexts.append({"rank": r, "activation": v, "context_id": cid, "position": p, "token_id": int(ids[p]),
                             "token": decode(int(ids[p])), "left": [decode(int(i)) for i in ids[lo:p]],
                             "right": [decode(int(i)) for i in ids[p + 1:hi]],
                             "left_ids": [int(i) for i in ids[lo:p]], "right_ids": [int(i) for i in ids[p + 1:hi]]})
        effects = None
        if logits is not None:
            effects = {k: [{"token_id": t, "token": decode(t), "value": v} for t, v in logits[f][k]]
                       for k in ("promoted", "suppressed")}
        attribution = {}
        for t, frame in per_task.items():
            row = frame.row(f, named=True)
            attribution[t] = {"attribution": row["attribution"], "rank": row["rank"], "verified": row["verified"],
                              "exact_effect": row["exact_effect"]}
        records.append({"feature": int(f), **base, "stats": stats.feature_stats(f), "top_contexts": contexts,
                        "logit_effects": effects, "task_attribution": attribution})
    return records


def write_jsonl(records: Sequence[dict[str, Any]], path: Path) -> None:
    atomic_write_jsonl(path, records)


def write_feature_records(records: Sequence[dict[str, Any]], path: Path) -> None:
    """`features.jsonl`: every record checked against `FeatureRecord`, then written atomically."""
    write_jsonl([check_document(FeatureRecord, rec) for rec in records], path)
