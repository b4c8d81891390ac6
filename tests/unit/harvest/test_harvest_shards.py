"""Shard files: lazy readers, resume after a kill, corruption detection."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest
from harvest_testlib import run

from mechflow.errors import IntegrityError
from mechflow.harvest import activation_dataset, iter_activation_batches, scan_activations, shards, verify_shards
from mechflow.io import sha256_file

HOOK = "blocks.1.hook_resid_post"


def shard_files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def test_polars_and_pyarrow_read_lazily(tmp_path, tiny_tokens, tiny_llama):
    tokens, ctx = tiny_tokens
    run(tmp_path, tokens, tiny_llama, layers=[1])
    full = np.concatenate(list(iter_activation_batches(tmp_path / "out" / "index.json", 7, as_numpy=True)))

    lazy = scan_activations(tmp_path / "out" / "shards")
    assert isinstance(lazy, pl.LazyFrame)
    picked = lazy.filter(pl.col("context_id") == 4).select("position", "activation").collect()
    assert picked.height == 12
    np.testing.assert_array_equal(np.stack(picked["activation"].to_numpy()), full[4 * 12 : 5 * 12])
    # Projection + predicate pushdown: the plan reads only the needed columns.
    plan = lazy.filter(pl.col("context_id") == 4).select("position").explain()
    assert "PROJECT 2/4 COLUMNS" in plan and 'col("context_id") == 4' in plan

    dataset = activation_dataset(tmp_path / "out" / "index.json")
    assert isinstance(dataset, pads.Dataset) and dataset.count_rows() == ctx.size
    table = dataset.to_table(columns=["activation"], filter=pc.field("context_id") == 4)
    np.testing.assert_array_equal(table.column("activation").combine_chunks().flatten().to_numpy().reshape(12, -1),
                                  full[48:60])


def test_iter_batches_order_shuffle_and_bounds(tmp_path, tiny_tokens, tiny_llama):
    tokens, ctx = tiny_tokens
    run(tmp_path, tokens, tiny_llama, layers=[1])
    folder = tmp_path / "out" / "shards" / HOOK
    plain = list(iter_activation_batches(folder, 7, as_numpy=True))
    assert [len(b) for b in plain] == [7] * 17 + [1]
    full = np.concatenate(plain)
    shuffled = [b.numpy() for b in iter_activation_batches(folder, 7, shuffle=True, seed=3, shuffle_buffer_rows=30)]
    again = [b.numpy() for b in iter_activation_batches(folder, 7, shuffle=True, seed=3, shuffle_buffer_rows=30)]
    assert all(np.array_equal(a, b) for a, b in zip(shuffled, again))
    mixed = np.concatenate(shuffled)
    assert not np.array_equal(mixed, full)
    assert np.array_equal(mixed[np.lexsort(mixed.T)], full[np.lexsort(full.T)])  # a permutation of the rows
    assert all(len(b) == 7 for b in iter_activation_batches(folder, 7, drop_last=True))


def test_resume_after_kill_keeps_complete_shards_and_matches_uninterrupted(tmp_path, tiny_tokens, tiny_llama,
                                                                           monkeypatch):
    tokens, _ = tiny_tokens
    cfg = {"layers": [0, 1], "hook_points": ["resid_post", "mlp_in"]}
    reference = run(tmp_path / "ref", tokens, tiny_llama, **cfg)
    ref_files = shard_files(tmp_path / "ref" / "out" / "shards")

    real_write, calls = shards.write_shard, []

    def dying_write(*args, **kwargs):
        if len(calls) == 6:  # 4 hooks per shard: dies inside shard 1, after 1.5 shards
            raise KeyboardInterrupt("simulated kill")
        calls.append(args[1].index)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(shards, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tokens, tiny_llama, **cfg)
    monkeypatch.setattr(shards, "write_shard", real_write)
    root = tmp_path / "out" / "shards"
    assert not (tmp_path / "out" / "index.json").exists() and not list(root.rglob("_manifest.json"))
    # A kill in the middle of a write leaves a temp file and possibly a shard without sidecar.
    (root / HOOK / ".part-00002.parquet.abc123.tmp").write_bytes(b"half a shard")
    (root / HOOK / "._part-00002.json.def456.tmp").write_bytes(b"{")
    survivors = {k: os.stat(p) for k, p in shard_files(root).items() if k.endswith(".parquet")}
    assert len(survivors) == 6

    resumed = run(tmp_path, tokens, tiny_llama, **cfg)
    assert resumed["shards_kept"] == 6 and resumed["shards_written"] == reference["shards_written"] - 6
    for key, st in survivors.items():
        now = os.stat(root / key)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), key
    files = shard_files(root)
    assert files.keys() == ref_files.keys()  # temp file gone, nothing extra
    for key, path in files.items():
        if key.endswith(".parquet"):
            assert sha256_file(path) == sha256_file(ref_files[key]), key


def test_corrupted_or_truncated_shard_is_named(tmp_path, tiny_tokens, tiny_llama):
    tokens, _ = tiny_tokens
    run(tmp_path, tokens, tiny_llama, layers=[1])
    folder = tmp_path / "out" / "shards" / HOOK
    verify_shards(folder)
    shard = folder / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="part-00001.parquet"):
        verify_shards(tmp_path / "out" / "index.json")
    with pytest.raises(IntegrityError, match="part-00001.parquet"):
        run(tmp_path, tokens, tiny_llama, layers=[1])  # resume refuses to build on a corrupted shard
    truncated = folder / "part-00002.parquet"
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(IntegrityError, match=r"part-00001\.parquet.*part-00002\.parquet"):
        verify_shards(folder / "_manifest.json")


def test_config_change_rewrites_shards_and_removes_extra_ones(tmp_path, tiny_tokens, tiny_llama):
    tokens, _ = tiny_tokens
    run(tmp_path, tokens, tiny_llama, layers=[1], shard_rows=24)  # 5 shards
    out = run(tmp_path, tokens, tiny_llama, layers=[1], shard_rows=24, dtype="float16")
    assert out["shards_written"] == 5 and out["shards_kept"] == 0
    out = run(tmp_path, tokens, tiny_llama, layers=[1], shard_rows=60, dtype="float16")  # 2 shards now
    folder = tmp_path / "out" / "shards" / HOOK
    assert sorted(p.name for p in folder.glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]
    assert verify_shards(folder).n_rows == 120
    assert json.loads((folder / "_part-00001.json").read_text())["shard"]["first_context"] == 5
