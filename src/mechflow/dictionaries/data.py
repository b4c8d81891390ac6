"""Stream shuffled activation batches from Parquet shards, with bounded memory.

Shuffling scheme (one "flat sequence" per epoch, defined entirely by `seed` and the epoch):

1. Every training shard is cut into chunks of `chunk_rows` consecutive rows.
2. Each epoch, all chunks of all shards are permuted with ``rng(seed, epoch)``.
3. Consecutive permuted chunks are gathered into groups of ``buffer_rows // chunk_rows``
   chunks (the shuffle buffer: rows of many shards mixed together).
4. A group is loaded (one Parquet row group at a time), BOS rows are dropped if asked, NaNs
   are rejected, and its rows are permuted with ``rng(seed, epoch, group)``.
5. The epoch is the concatenation of the permuted groups; batches are consecutive
   `batch_size` slices of that sequence (the last batch of an epoch is completed with the
   first rows of the next epoch, so every row is used once per epoch and none twice).

Because the sequence is a pure function of `(seed, epoch, group)`, the resumable state is
just ``{"epoch", "group", "offset"}``: restarting from it reloads one group and continues
exactly where the previous run stopped. Peak memory is about two groups (the group being
consumed and the tail of the previous one) plus one Parquet row group; efficient reading
needs harvest row groups no larger than a few chunks (a warning is logged otherwise).

This is the same buffer-shuffle idea as SAELens' mixing buffer
(`sae_lens.training.mixing_buffer`), made exactly reproducible and resumable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mechflow.contracts.filenames import SHARD_MANIFEST
from mechflow.contracts.harvest import HarvestManifest, ShardInfo
from mechflow.errors import ConfigError, DataError, IntegrityError, one_line
from mechflow.io import sha256_file_cached

log = logging.getLogger(__name__)

_HARVEST_HINT = "re-run the harvest stage for this (model, hook) to regenerate the shards"


# ----------------------------------------------------------------------------- manifests


def manifest_path(path: str | Path) -> Path:
    """The `_manifest.json` file for a manifest path or its folder."""
    path = Path(path)
    return path / SHARD_MANIFEST if path.is_dir() else path


def load_manifest(path: str | Path) -> tuple[HarvestManifest, Path]:
    """Read a `_manifest.json` (or the folder holding it); return it and its shard folder."""
    path = manifest_path(path)
    if not path.exists():
        raise DataError(f"harvest manifest {path} does not exist: {_HARVEST_HINT}")
    try:
        manifest = HarvestManifest.model_validate_json(path.read_text())
    except Exception as exc:  # pydantic ValidationError or JSON error: both mean a bad file
        raise DataError(f"harvest manifest {path} is not a valid HarvestManifest ({one_line(exc)}); "
                        f"{_HARVEST_HINT}") from exc
    if not manifest.shards:
        raise DataError(f"harvest manifest {path} lists no shards; {_HARVEST_HINT}")
    return manifest, path.parent


def split_shards(manifest: HarvestManifest, holdout_shards: int, field: str = "data.holdout_shards"
                 ) -> tuple[list[ShardInfo], list[ShardInfo]]:
    """Split a manifest's shards into (train, held-out): the last `holdout_shards` are held out."""
    n = len(manifest.shards)
    if holdout_shards < 0 or (holdout_shards > 0 and holdout_shards >= n):
        raise ConfigError(f"{field}={holdout_shards} leaves no training shard: the manifest has {n} "
                          f"shard(s); harvest more tokens (smaller harvest.shard_rows) or lower {field}")
    if holdout_shards == 0:
        return list(manifest.shards), []
    return list(manifest.shards[:-holdout_shards]), list(manifest.shards[-holdout_shards:])


# ----------------------------------------------------------------------------- decoding


def _stored_width(path: Path) -> int | None:
    """The activation width a shard's Parquet footer declares (its fixed-size-list length)."""
    try:
        field = pq.read_schema(path).field("activation")
    except (KeyError, OSError, pa.ArrowException) as exc:
        raise DataError(f"activation shard {path} is not a readable activations table ({one_line(exc)}): "
                        f"{_HARVEST_HINT}") from exc
    return getattr(field.type, "list_size", None)


def activation_matrix(column: pa.Array | pa.ChunkedArray, d: int, dtype: str) -> np.ndarray:
    """Decode a fixed-size-list activation column into a float32 ``[rows, d]`` array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    if dtype == "bfloat16":  # stored as the upper 16 bits of a float32 (contracts.parquet)
        flat = (flat.astype(np.uint32) << 16).view(np.float32)
    return np.ascontiguousarray(flat.reshape(-1, d), dtype=np.float32)


@dataclass(frozen=True)
class _Chunk:
    shard: int  # index into the source's shard list
    start: int  # first row (inside the shard)
    stop: int


class ShardSource:
    """Random access to row ranges of the shards of one or more aligned manifests.

    With several manifests (e.g. a transcoder's MLP input and output hooks), the shards must
    hold the same rows in the same order; each chunk is read from every manifest and the
    vectors are concatenated along the feature axis (checked row by row on `context_id`).
    """

    def __init__(self, manifests: Sequence[str | Path], shards: Sequence[str] | None = None, *,
                 exclude_bos: bool = True, verify_sha256: bool = True, check_nan: bool = True):
        loaded = [load_manifest(m) for m in manifests]
        self.manifests = [m for m, _ in loaded]
        self.folders = [f for _, f in loaded]
        first = self.manifests[0]
        names = list(shards) if shards is not None else [s.file for s in first.shards]
        by_name = [{s.file: s for s in m.shards} for m in self.manifests]
        for m, table, mpath in zip(self.manifests, by_name, manifests):
            missing = [n for n in names if n not in table]
            if missing:
                raise DataError(f"manifest {mpath} does not list shard(s) {missing[:3]}; the manifests "
                                f"passed together must cover the same shards ({_HARVEST_HINT})")
            for n in names:
                if table[n].rows != by_name[0][n].rows:
                    raise DataError(f"shard {n} has {table[n].rows} rows in {mpath} but "
                                    f"{by_name[0][n].rows} in {manifests[0]}: manifests are not aligned")
        self.shards: list[list[ShardInfo]] = [[t[n] for n in names] for t in by_name]
        self.shard_names = names
        self.rows = [s.rows for s in self.shards[0]]
        self.d_parts = [m.d for m in self.manifests]
        self.d = sum(self.d_parts)
        self.exclude_bos = bool(exclude_bos and first.prepend_bos)
        self.max_norm: float | None = None  # set by `drop_outlier_rows`
        self.outlier_filter: dict[str, Any] | None = None  # its record, see `outlier_summary`
        self.n_dropped_outliers = 0
        self.check_nan = check_nan
        self._files: dict[tuple[int, int], pq.ParquetFile] = {}
        for mi, folder in enumerate(self.folders):
            for info in self.shards[mi]:
                path = folder / info.file
                if not path.exists():
                    raise DataError(f"activation shard {path} (listed in {folder / SHARD_MANIFEST}) is "
                                    f"missing: {_HARVEST_HINT}")
                if verify_sha256 and sha256_file_cached(path) != info.sha256:
                    raise IntegrityError(f"activation shard {path} does not match the sha256 in its "
                                         f"manifest (corrupted or overwritten): {_HARVEST_HINT}")
                width = _stored_width(path)
                if width != self.d_parts[mi]:
                    raise DataError(f"activation shard {path} holds activations of width {width} but its manifest "
                                    f"{folder / SHARD_MANIFEST} says d={self.d_parts[mi]}: {_HARVEST_HINT}")
        self._warned_row_groups = False

    @property
    def n_rows(self) -> int:
        return sum(self.rows)

    OPEN_FILES = 4  # per source; a group's chunks are read shard by shard, so a few suffice

    def _file(self, mi: int, si: int) -> pq.ParquetFile:
        """The shard's open ParquetFile, from a small LRU: an open ParquetFile keeps several MB of Arrow
        buffers, so keeping every shard open made training's memory grow with the corpus (peak RSS +55%
        from 100k to 1M tokens, measured by benchmarks/costs.py); with the LRU it stays flat."""
        key = (mi, si)
        if key in self._files:
            self._files[key] = self._files.pop(key)  # most recently used last
        else:
            while len(self._files) >= self.OPEN_FILES:
                self._files.pop(next(iter(self._files))).close()
            self._files[key] = pq.ParquetFile(self.folders[mi] / self.shards[mi][si].file)
        return self._files[key]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _row_group_bounds(self, mi: int, si: int) -> np.ndarray:
        md = self._file(mi, si).metadata
        sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        return np.concatenate([[0], np.cumsum(sizes)])

    def read_chunks(self, chunks: Sequence[_Chunk]) -> tuple[np.ndarray, np.ndarray]:
        """Rows of `chunks` (in the given order) as ``(activations [n, d], context_id|position [n, 2])``.

        BOS rows are dropped when the source excludes them; NaNs raise a DataError naming the
        shard file and row.
        """
        # Read each needed Parquet row group once, slicing out all chunks that fall in it.
        order = sorted(range(len(chunks)), key=lambda i: (chunks[i].shard, chunks[i].start))
        acts_out: list[np.ndarray | None] = [None] * len(chunks)
        meta_out: list[np.ndarray | None] = [None] * len(chunks)
        for mi in range(len(self.manifests)):
            cache_key: tuple[int, int] | None = None
            table: pa.Table | None = None
            for i in order:
                c = chunks[i]
                bounds = self._row_group_bounds(mi, c.shard)
                g0 = int(np.searchsorted(bounds, c.start, side="right") - 1)
                g1 = int(np.searchsorted(bounds, c.stop - 1, side="right") - 1)
                if cache_key != (c.shard, g0) or g1 != g0:
                    groups = list(range(g0, g1 + 1))
                    table = self._file(mi, c.shard).read_row_groups(groups)
                    cache_key = (c.shard, g0) if g1 == g0 else None
                    if not self._warned_row_groups and table.num_rows > 8 * (c.stop - c.start):
                        self._warned_row_groups = True
                        log.warning("shard %s has Parquet row groups of %d rows, much larger than "
                                    "data.chunk_rows=%d: each chunk reads a whole row group (slow); "
                                    "write shards with smaller row groups or raise data.chunk_rows",
                                    self.shards[mi][c.shard].file, table.num_rows, c.stop - c.start)
                assert table is not None
                part = table.slice(c.start - int(bounds[g0]), c.stop - c.start)
                acts = activation_matrix(part.column("activation"), self.d_parts[mi], self.manifests[mi].dtype)
                meta = np.stack([part.column("context_id").to_numpy(), part.column("position").to_numpy()], 1)
                if mi == 0:
                    acts_out[i], meta_out[i] = acts, meta
                else:
                    if not np.array_equal(meta, meta_out[i]):
                        raise DataError(f"shard {self.shards[mi][c.shard].file} rows {c.start}..{c.stop} hold "
                                        f"different (context_id, position) in {self.folders[mi]} than in "
                                        f"{self.folders[0]}: the manifests are not aligned; harvest both hooks "
                                        "in one run")
                    acts_out[i] = np.concatenate([acts_out[i], acts], axis=1)
            table = None
        acts_all = np.concatenate(acts_out, 0) if chunks else np.zeros((0, self.d), np.float32)
        meta_all = np.concatenate(meta_out, 0) if chunks else np.zeros((0, 2), np.int64)
        if self.check_nan:
            bad = ~np.isfinite(acts_all).all(axis=1)
            if bad.any():
                row = int(np.argmax(bad))
                offsets = np.cumsum([0] + [c.stop - c.start for c in chunks])
                ci = int(np.searchsorted(offsets, row, side="right") - 1)
                c = chunks[ci]
                raise DataError(f"activation shard {self.shards[0][c.shard].file} row {c.start + row - offsets[ci]} "
                                "holds NaN/inf values: the model overflowed at this hook (harvest in float32 "
                                f"or drop the context); {_HARVEST_HINT}")
        if self.exclude_bos:
            keep = meta_all[:, 1] != 0
            acts_all, meta_all = acts_all[keep], meta_all[keep]
        if self.max_norm is not None:
            norms = np.linalg.norm(acts_all[:, :self.d_parts[0]], axis=1)
            over = norms > self.max_norm
            self.n_dropped_outliers += int(over.sum())
            if self.outlier_filter and self.outlier_filter["mode"] == "clip":
                acts_all[over] *= (self.max_norm / norms[over])[:, None].astype(acts_all.dtype)
            else:
                acts_all, meta_all = acts_all[~over], meta_all[~over]
        return acts_all, meta_all

    def outlier_summary(self) -> dict[str, Any] | None:
        """The outlier filter's record with the rows it has dropped so far (None: no filter)."""
        return self.outlier_filter and {**self.outlier_filter, "rows_dropped": self.n_dropped_outliers}

    def row_norms(self, columns: slice, chunk_rows: int, max_rows: int | None = None) -> np.ndarray:
        """float64 norms of ``columns`` of the first `max_rows` usable rows, in shard order."""
        norms = [np.linalg.norm(acts[:, columns].astype(np.float64), axis=1)
                 for acts, _ in self.iter_sequential(chunk_rows, max_rows)]
        return np.concatenate(norms) if norms else np.zeros(0)

    def iter_sequential(self, chunk_rows: int, max_rows: int | None = None
                        ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield every (non-BOS) row once, in shard order, `chunk_rows` at a time (for evaluation)."""
        seen = 0
        for si, n in enumerate(self.rows):
            for start in range(0, n, chunk_rows):
                acts, meta = self.read_chunks([_Chunk(si, start, min(n, start + chunk_rows))])
                if max_rows is not None and seen + len(acts) > max_rows:
                    acts, meta = acts[: max_rows - seen], meta[: max_rows - seen]
                seen += len(acts)
                if len(acts):
                    yield acts, meta
                if max_rows is not None and seen >= max_rows:
                    return


def drop_outlier_rows(source: ShardSource, factor: float | None, sample_rows: int = 65536, *,
                      clip: bool = False) -> dict[str, Any] | None:
    """Make `source` drop (or, with `clip`, shrink) rows whose norm exceeds ``factor`` x the median norm.

    The norm is that of the first hook's columns; the median comes from the first `sample_rows`
    usable rows in shard order. Why: a few attention-sink positions (SmolLM2 layer 15: ~0.7% of
    non-BOS tokens, mostly mid-context ``<|endoftext|>`` document separators, norms ~80x the
    median) hold ~99% of the centred variance, so they dominate an MSE loss and the
    norm-scaling estimate; evaluation reports EV without them (and with them) by the same rule.
    Dropping them leaves the dictionary unable to reconstruct them when spliced into the model;
    clipping rescales such a row to norm ``factor`` x median (direction kept), so its direction is
    still learnt with a bounded weight in the loss. Clipping applies to the whole row, so it is
    only meaningful for a single hook (SAEs; an MLP's output does not scale with its input).
    Returns the filter's record for training.json (None when ``factor`` is None); its
    ``rows_dropped`` counts the rows dropped or clipped.
    """
    if factor is None:
        return None
    if clip and len(source.manifests) > 1:
        raise ConfigError("data.clip_outliers rescales whole rows, which is wrong for paired hooks (a transcoder's "
                          "MLP output does not scale with its input); use data.drop_outliers there")
    norms = source.row_norms(slice(0, source.d_parts[0]), 4096, sample_rows)
    median = float(np.median(norms)) if len(norms) else 0.0
    source.max_norm = factor * median
    source.n_dropped_outliers = 0
    source.outlier_filter = {"factor": factor, "mode": "clip" if clip else "drop", "median_norm": median,
                             "max_norm": source.max_norm, "median_sample_rows": sample_rows}
    return source.outlier_filter


# ----------------------------------------------------------------------------- the stream


class ActivationStream(Iterator[torch.Tensor]):
    """Infinite iterator of shuffled ``[batch_size, d]`` float32 batches (a SAELens DataProvider).

    Args:
        source: the shards to read (`ShardSource`).
        batch_size: rows per batch.
        buffer_rows: shuffle-buffer size in rows (rows of this many are mixed across shards).
        chunk_rows: contiguous rows read per chunk (the shuffle granularity across shards).
        seed: fixes the whole sequence.
        prefetch: batches prepared ahead in a background thread (0: none). Parquet decoding
            releases the GIL, so this overlaps reading with training.
        state: a `state_dict()` from an earlier stream over the same source to resume from.
    """

    def __init__(self, source: ShardSource, *, batch_size: int, buffer_rows: int = 65536,
                 chunk_rows: int = 2048, seed: int = 0, prefetch: int = 0,
                 state: dict[str, int] | None = None):
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        if chunk_rows < 1:
            raise ConfigError(f"data.chunk_rows={chunk_rows} must be >= 1")
        if buffer_rows < chunk_rows:
            raise ConfigError(f"data.buffer_rows={buffer_rows} must be >= data.chunk_rows={chunk_rows}")
        self.source = source
        self.batch_size = batch_size
        self.chunk_rows = chunk_rows
        self.chunks_per_group = max(1, buffer_rows // chunk_rows)
        self.seed = seed
        self.chunks = [_Chunk(si, s, min(n, s + chunk_rows))
                       for si, n in enumerate(source.rows) for s in range(0, n, chunk_rows)]
        if not self.chunks:
            raise DataError(f"no activation rows to train on in shards {source.shard_names}; {_HARVEST_HINT}")
        self.n_groups = -(-len(self.chunks) // self.chunks_per_group)
        self._state = dict(state) if state else {"epoch": 0, "group": 0, "offset": 0}
        self._prefetch = prefetch
        self._gen = self._generate(dict(self._state))
        if prefetch > 0:
            from sae_lens.training.prefetch import PrefetchingIterator

            self._gen = PrefetchingIterator(self._gen, prefetch=prefetch)

    # -- resumable state: the position just after the last batch handed to the consumer
    def state_dict(self) -> dict[str, int]:
        return dict(self._state)

    def epoch_order(self, epoch: int) -> list[_Chunk]:
        rng = np.random.default_rng([self.seed, epoch])
        return [self.chunks[i] for i in rng.permutation(len(self.chunks))]

    def load_group(self, epoch: int, group: int) -> np.ndarray:
        """Rows of one shuffle group of one epoch, already permuted (deterministic)."""
        order = self.epoch_order(epoch)
        chunks = order[group * self.chunks_per_group:(group + 1) * self.chunks_per_group]
        acts, _ = self.source.read_chunks(chunks)
        perm = np.random.default_rng([self.seed, epoch, group]).permutation(len(acts))
        return acts[perm]

    def _generate(self, state: dict[str, int]) -> Iterator[tuple[torch.Tensor, dict[str, int]]]:
        epoch, group, offset = state["epoch"], state["group"], state["offset"]
        pending: list[np.ndarray] = []
        n_pending = 0
        empty_groups = 0
        while True:
            rows = self.load_group(epoch, group)[offset:]
            if len(rows) == 0:
                empty_groups += 1
                if empty_groups > self.n_groups:
                    raise DataError(f"shards {self.source.shard_names} hold no usable rows (all BOS?); "
                                    f"{_HARVEST_HINT}")
            else:
                empty_groups = 0
            pos = 0
            while pos < len(rows):
                take = min(self.batch_size - n_pending, len(rows) - pos)
                pending.append(rows[pos:pos + take])
                n_pending += take
                pos += take
                if n_pending == self.batch_size:
                    batch = torch.from_numpy(np.concatenate(pending, 0) if len(pending) > 1 else pending[0].copy())
                    pending, n_pending = [], 0
                    after = {"epoch": epoch, "group": group, "offset": offset + pos}
                    if after["offset"] == offset + len(rows):  # group exhausted: point at the next one
                        after = self._advance(epoch, group)
                    yield batch, after
            epoch, group = self._next_group(epoch, group)
            offset = 0

    def _next_group(self, epoch: int, group: int) -> tuple[int, int]:
        return (epoch, group + 1) if group + 1 < self.n_groups else (epoch + 1, 0)

    def _advance(self, epoch: int, group: int) -> dict[str, int]:
        e, g = self._next_group(epoch, group)
        return {"epoch": e, "group": g, "offset": 0}

    def __iter__(self) -> "ActivationStream":
        return self

    def __next__(self) -> torch.Tensor:
        batch, self._state = next(self._gen)
        return batch

    def close(self) -> None:
        if hasattr(self._gen, "close"):
            self._gen.close()
        self.source.close()


def rows_per_epoch(stream: ActivationStream) -> int:
    """Usable rows in one epoch (reads only the `position` column when BOS rows are dropped)."""
    src = stream.source
    if not src.exclude_bos:
        return src.n_rows
    total = 0
    for si in range(len(src.rows)):
        pos = pq.read_table(src.folders[0] / src.shards[0][si].file, columns=["position"]).column(0).to_numpy()
        total += int((pos != 0).sum())
    return total


def in_memory_stream(acts: torch.Tensor, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Batches of a tensor already in memory, reshuffled every epoch (benchmark baseline)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(acts), generator=g)
        for i in range(0, len(acts) - batch_size + 1, batch_size):
            yield acts[perm[i:i + batch_size]]


def stream_config_summary(stream: ActivationStream) -> dict[str, Any]:
    return {"batch_size": stream.batch_size, "chunk_rows": stream.chunk_rows,
            "buffer_rows": stream.chunks_per_group * stream.chunk_rows, "seed": stream.seed,
            "shards": stream.source.shard_names, "exclude_bos": stream.source.exclude_bos}
