"""Activation shards on disk: writing (atomic, with checksum sidecars) and lazy, bounded readers.

Layout of one hook folder (``harvest_dir/<hook>/``)::

    part-00000.parquet   ACTIVATIONS schema, zstd, row groups of `row_group_rows`
    _part-00000.json     sidecar (ShardSidecar): the shard's ShardInfo (sha256 included), `d` and a plan key
    _manifest.json       HarvestManifest, written once every shard is present

Shard ``i`` always holds contexts ``[i*k, min((i+1)*k, n))`` with ``k = shard_rows // context_size``
(whole contexts only), so the mapping shard → contexts follows from the config and resume is
exact. A shard counts as complete when its sidecar exists, its plan key (model, corpus, hook,
dtype, context range, batch size, …) matches the current run and the file's sha256 equals the
sidecar's; a shard without sidecar was interrupted between its rename and the sidecar and is
redone. A checksum mismatch is corruption: ``IntegrityError`` naming the file.

bfloat16 is stored as the upper 16 bits of each float32 (uint16; Arrow has no bfloat16). Readers
here decode it back to float32 exactly (bf16 → f32 is lossless; f32 → bf16 rounds to nearest even).
Leading ``_``/``.`` names keep sidecars and temp files out of ``pyarrow.dataset`` directory scans.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from mechflow.contracts.documents import write_document
from mechflow.contracts.filenames import SHARD_MANIFEST, SHARD_PATTERN
from mechflow.contracts.harvest import HarvestIndex, HarvestManifest, ShardInfo, ShardSidecar
from mechflow.contracts.parquet import activations_schema
from mechflow.errors import ConfigError, DataError, IntegrityError, one_line
from mechflow.io import atomic_path, sha256_file

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Plan


@dataclass(frozen=True)
class ShardPlan:
    """Shard `index` holds contexts [first_context, stop_context)."""

    index: int
    first_context: int
    stop_context: int

    @property
    def file(self) -> str:
        return SHARD_PATTERN.format(index=self.index)

    @property
    def sidecar(self) -> str:
        return "_" + self.file.removesuffix(".parquet") + ".json"


def plan_shards(n_contexts: int, context_size: int, shard_rows: int) -> list[ShardPlan]:
    """Deterministic split of contexts 0..n-1 into shards of whole contexts, ≤ `shard_rows` rows each."""
    if shard_rows < context_size:
        raise ConfigError(f"harvest.shard_rows={shard_rows} is smaller than one context ({context_size} "
                          f"tokens); set it to at least {context_size}")
    per = shard_rows // context_size
    return [ShardPlan(i, a, min(a + per, n_contexts)) for i, a in enumerate(range(0, n_contexts, per))]


# --------------------------------------------------------------------------------------------
# Encoding


def encode_activations(act: torch.Tensor, dtype: str) -> np.ndarray:
    """[rows, d] tensor → numpy array in the storage dtype (bfloat16 as uint16 bit patterns)."""
    if dtype == "float32":
        return act.to(torch.float32).numpy()
    if dtype == "float16":
        return act.to(torch.float16).numpy()
    return act.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def decode_activations(values: np.ndarray, dtype: str) -> np.ndarray:
    """Storage array → float32 (exact for every stored dtype)."""
    if dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32, copy=False)


def shard_table(context_ids: np.ndarray, tokens: np.ndarray, acts: np.ndarray, dtype: str) -> pa.Table:
    """ACTIVATIONS table for `tokens` [n_ctx, ctx] and `acts` [n_ctx*ctx, d] in storage dtype."""
    n_ctx, ctx = tokens.shape
    d = acts.shape[1]
    schema = activations_schema(d, dtype)
    values = pa.array(acts.reshape(-1), type=schema.field("activation").type.value_type)
    return pa.Table.from_arrays(
        [
            pa.array(np.repeat(context_ids.astype(np.int64), ctx)),
            pa.array(np.tile(np.arange(ctx, dtype=np.int32), n_ctx)),
            pa.array(tokens.reshape(-1).astype(np.int32)),
            pa.FixedSizeListArray.from_arrays(values, d),
        ],
        schema=schema,
    )


def write_shard(folder: Path, plan: ShardPlan, table: pa.Table, *, plan_key: str, compression_level: int,
                row_group_rows: int) -> ShardInfo:
    """Write one shard atomically, then its sidecar (also atomic); returns its ShardInfo."""
    path = folder / plan.file
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", compression_level=compression_level,
                       row_group_size=row_group_rows, use_dictionary=["context_id", "position", "token_id"],
                       write_statistics=["context_id", "position", "token_id"])
        digest = sha256_file(tmp)
    info = ShardInfo(file=plan.file, rows=table.num_rows, sha256=digest, first_context=plan.first_context,
                     last_context=plan.stop_context - 1)
    d = table.schema.field("activation").type.list_size
    write_document(folder / plan.sidecar, ShardSidecar, {"shard": info.model_dump(), "d": d, "plan_key": plan_key})
    return info


def completed_shard(folder: Path, plan: ShardPlan, plan_key: str) -> tuple[ShardInfo, int] | None:
    """(ShardInfo, d) of a complete, verified shard from an earlier run, else None (must be written).

    Raises:
        IntegrityError: the shard exists with its sidecar and plan key but its bytes changed.
    """
    path, sidecar = folder / plan.file, folder / plan.sidecar
    if not (path.exists() and sidecar.exists()):
        return None
    try:
        meta = ShardSidecar.model_validate_json(sidecar.read_text())
        info, d = meta.shard, meta.d
    except (ValueError, KeyError, TypeError):
        log.warning("%s is unreadable; shard %s will be rewritten", sidecar, path.name)
        return None
    if meta.plan_key != plan_key:
        log.info("%s was written under another config; rewriting it", path)
        return None
    if sha256_file(path) != info.sha256:
        raise IntegrityError(f"{path}: sha256 does not match its sidecar {sidecar.name} (corrupted or truncated "
                             f"shard); delete {path.name} and {sidecar.name} and rerun to regenerate it")
    return info, d


def remove_stale(folder: Path, n_shards: int) -> None:
    """Delete temp files of killed runs and shards beyond the current plan (from a larger run)."""
    for tmp in folder.glob(".*.tmp"):  # atomic_path temp files of shards, sidecars, manifests
        tmp.unlink()
    for path in folder.glob("part-*.parquet"):
        try:
            index = int(path.stem.split("-")[1])
        except (IndexError, ValueError):
            continue
        if index >= n_shards:
            log.info("removing %s: beyond the current shard plan", path)
            path.unlink()
            (folder / ("_" + path.stem + ".json")).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Readers


def resolve_manifest(path: str | Path, hook: str | None = None) -> Path:
    """The `_manifest.json` for `path`: a manifest, a hook folder, a harvest folder (+ `hook`) or an index."""
    path = Path(path)
    if path.is_file() and path.name == SHARD_MANIFEST:
        return path
    if path.is_file():  # the harvest index
        try:
            index = HarvestIndex.model_validate_json(path.read_text())
            entries = {h.hook: h for h in index.hooks}
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: neither a {SHARD_MANIFEST} nor a harvest index ({one_line(exc)}); pass a "
                            "hook's manifest or the harvest's index.json, or rerun the harvest stage") from exc
        return path.parent / index.harvest_dir / _pick(entries, hook, path).manifest
    if (path / SHARD_MANIFEST).is_file():
        return path / SHARD_MANIFEST
    found = {p.parent.name: p for p in sorted(path.glob(f"*/{SHARD_MANIFEST}"))}
    if not found:
        raise DataError(f"{path}: no {SHARD_MANIFEST} here or one folder below; run the harvest stage first")
    return _pick(found, hook, path)


def _pick(entries: dict, hook: str | None, where: Path):
    if hook is None and len(entries) == 1:
        return next(iter(entries.values()))
    if hook not in entries:
        raise ConfigError(f"hook={hook!r}: {where} holds hooks {sorted(entries)}; pass one of them")
    return entries[hook]


def load_manifest(path: str | Path, hook: str | None = None) -> tuple[HarvestManifest, Path]:
    """The HarvestManifest (validated) and the path it came from."""
    mpath = resolve_manifest(path, hook)
    try:
        return HarvestManifest.model_validate_json(mpath.read_text()), mpath
    except ValueError as exc:
        raise DataError(f"{mpath}: not a valid {SHARD_MANIFEST} ({one_line(exc)}); rerun the harvest stage") from exc


def shard_paths(path: str | Path, hook: str | None = None) -> list[Path]:
    """Absolute shard files of one hook, in shard order (from its manifest, never a glob)."""
    manifest, mpath = load_manifest(path, hook)
    return [mpath.parent / s.file for s in manifest.shards]


def verify_shards(path: str | Path, hook: str | None = None) -> HarvestManifest:
    """Check every shard of the manifest exists and matches its sha256.

    Raises:
        IntegrityError: naming every missing or corrupted shard file.
    """
    manifest, mpath = load_manifest(path, hook)
    bad = []
    for shard in manifest.shards:
        f = mpath.parent / shard.file
        if not f.exists():
            bad.append(f"{f} (missing)")
        elif sha256_file(f) != shard.sha256:
            bad.append(f"{f} (sha256 mismatch: corrupted or truncated)")
    if bad:
        raise IntegrityError(f"{len(bad)} bad shard(s): {'; '.join(bad)}. Delete them (and their _part-*.json "
                             f"sidecars) and rerun the harvest stage to regenerate them")
    return manifest


def scan_activations(path: str | Path, hook: str | None = None) -> "pl.LazyFrame":  # noqa: F821
    """Lazy polars frame over one hook's shards (nothing is read until `.collect()`).

    bfloat16 shards show their `activation` as uint16 bit patterns; decode with
    ``decode_activations`` (or read through ``iter_activation_batches``).
    """
    import polars as pl

    return pl.scan_parquet([str(p) for p in shard_paths(path, hook)])


def activation_dataset(path: str | Path, hook: str | None = None) -> pads.Dataset:
    """`pyarrow.dataset` over one hook's shards (lazy; filter/project with scanners)."""
    return pads.dataset([str(p) for p in shard_paths(path, hook)], format="parquet")


def _column_to_numpy(col: pa.ChunkedArray | pa.Array, dtype: str) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        d = col.type.list_size
        return decode_activations(col.flatten().to_numpy(zero_copy_only=False), dtype).reshape(-1, d)
    return col.to_numpy(zero_copy_only=False)


def iter_activation_batches(path: str | Path, batch_rows: int, columns: Sequence[str] | None = None, *,
                            shuffle: bool = False, seed: int = 0, shuffle_buffer_rows: int | None = None,
                            drop_last: bool = False, as_numpy: bool = False, hook: str | None = None,
                            ) -> Iterator[torch.Tensor | np.ndarray | dict]:
    """Stream rows of one hook's shards in batches of `batch_rows`, reading one row group at a time.

    Args:
        path: manifest, hook folder, harvest folder or index (see ``resolve_manifest``).
        batch_rows: rows per batch (the last one may be smaller unless `drop_last`).
        columns: None → yield the activation matrix [batch, d] (float32); a list → yield a dict
            column → array (activation decoded to float32).
        shuffle: visit (shard, row group) units in a seeded random order and permute rows inside a
            buffer of `shuffle_buffer_rows` (default max(8*batch_rows, 16384)); memory stays bounded
            by the buffer plus one row group.
        seed: shuffle seed (same seed → same order).
        as_numpy: yield numpy arrays instead of torch tensors.
    """
    if batch_rows < 1:
        raise ConfigError(f"batch_rows={batch_rows} must be ≥ 1")
    manifest, mpath = load_manifest(path, hook)
    cols = ["activation"] if columns is None else list(columns)
    files = [pq.ParquetFile(mpath.parent / s.file) for s in manifest.shards]
    units = [(f, g) for f in files for g in range(f.num_row_groups)]
    rng = np.random.default_rng(seed)
    if shuffle:
        units = [units[i] for i in rng.permutation(len(units))]
    target = (shuffle_buffer_rows or max(8 * batch_rows, 16384)) if shuffle else batch_rows

    def emit(buf: dict[str, np.ndarray], n: int):
        batch = {c: v[:n] for c, v in buf.items()}
        if not as_numpy:
            batch = {c: torch.from_numpy(np.ascontiguousarray(v)) for c, v in batch.items()}
        return batch["activation"] if columns is None else batch

    pending: list[dict[str, np.ndarray]] = []
    n_pending = 0
    for f, g in units:
        table = f.read_row_group(g, columns=cols)
        pending.append({c: _column_to_numpy(table.column(c), manifest.dtype) for c in cols})
        n_pending += table.num_rows
        if n_pending < target:
            continue
        buf = {c: np.concatenate([p[c] for p in pending]) for c in cols}
        if shuffle:
            perm = rng.permutation(n_pending)
            buf = {c: v[perm] for c, v in buf.items()}
        start = 0
        while n_pending - start >= batch_rows:
            yield emit({c: v[start:] for c, v in buf.items()}, batch_rows)
            start += batch_rows
        pending = [{c: v[start:] for c, v in buf.items()}] if start < n_pending else []
        n_pending -= start
    if n_pending:
        buf = {c: np.concatenate([p[c] for p in pending]) for c in cols}
        if shuffle:
            perm = rng.permutation(n_pending)
            buf = {c: v[perm] for c, v in buf.items()}
        for start in range(0, n_pending, batch_rows):
            if n_pending - start < batch_rows and drop_last:
                break
            yield emit({c: v[start:] for c, v in buf.items()}, min(batch_rows, n_pending - start))
