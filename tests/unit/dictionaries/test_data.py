"""The activation stream: shuffling, exactly-once epochs, resume, hold-out and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dictionary_shards import write_shards

from mechflow.dictionaries.data import ActivationStream, ShardSource, load_manifest, split_shards
from mechflow.errors import ConfigError, DataError, IntegrityError

N_CTX, T, D = 12, 16, 4


def _acts() -> np.ndarray:
    # Each row encodes its own (context, position) so batches can be traced back to rows.
    a = np.zeros((N_CTX, T, D), np.float32)
    a[..., 0] = np.arange(N_CTX)[:, None]
    a[..., 1] = np.arange(T)[None, :]
    a[..., 2] = np.random.default_rng(0).normal(size=(N_CTX, T))
    return a


def _ids(batch: torch.Tensor) -> list[tuple[int, int]]:
    return [(int(r[0]), int(r[1])) for r in batch]


@pytest.fixture()
def manifest(tmp_path):
    return write_shards(tmp_path / "h", _acts(), contexts_per_shard=3, row_group_rows=16)


def _stream(manifest, **kw):
    src = ShardSource([manifest], exclude_bos=kw.pop("exclude_bos", True))
    return ActivationStream(src, **{"batch_size": 20, "buffer_rows": 64, "chunk_rows": 8, "seed": 1, **kw})


def test_one_epoch_yields_every_non_bos_row_exactly_once(manifest):
    s = _stream(manifest)
    n_rows = N_CTX * (T - 1)  # BOS (position 0) dropped: the manifest says prepend_bos
    rows = []
    while len(rows) < n_rows:
        rows += _ids(next(s))
    epoch = rows[:n_rows]
    assert len(set(epoch)) == n_rows
    assert all(p != 0 for _, p in epoch)
    assert set(epoch) == {(c, p) for c in range(N_CTX) for p in range(1, T)}


def test_keeps_bos_when_asked(manifest):
    s = _stream(manifest, exclude_bos=False, batch_size=N_CTX * T)
    assert len(set(_ids(next(s)))) == N_CTX * T


def test_shuffle_mixes_shards_and_is_deterministic(manifest):
    a, b, c = _stream(manifest), _stream(manifest), _stream(manifest, seed=2)
    ba, bb, bc = next(a), next(b), next(c)
    assert torch.equal(ba, bb)
    assert not torch.equal(ba, bc)
    contexts = {cid for cid, _ in _ids(ba)}
    assert len({cid // 3 for cid in contexts}) >= 2  # rows from more than one shard in one batch
    # consecutive rows are not consecutive positions of one context (buffer shuffle)
    ids = _ids(ba)
    adjacent = sum(ids[i + 1] == (ids[i][0], ids[i][1] + 1) for i in range(len(ids) - 1))
    assert adjacent < 5


def test_epochs_are_reshuffled(manifest):
    s = _stream(manifest, batch_size=N_CTX * (T - 1))
    e0, e1 = _ids(next(s)), _ids(next(s))
    assert set(e0) == set(e1) and e0 != e1


def test_resume_continues_without_repeats(manifest):
    full = _stream(manifest)
    ref = [next(full) for _ in range(14)]  # crosses an epoch boundary (180 rows / 20 per batch)
    first = _stream(manifest)
    got = [next(first) for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    first.close()
    resumed = _stream(manifest, state=state)
    got += [next(resumed) for _ in range(9)]
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


def test_prefetch_gives_the_same_sequence_and_state(manifest):
    plain, pre = _stream(manifest), _stream(manifest, prefetch=3)
    for _ in range(4):
        assert torch.equal(next(plain), next(pre))
    assert plain.state_dict() == pre.state_dict()
    pre.close()


def test_holdout_is_by_shard(manifest):
    man, _ = load_manifest(manifest)
    train, held = split_shards(man, 1)
    assert [s.file for s in held] == [man.shards[-1].file]
    s = ActivationStream(ShardSource([manifest], [x.file for x in train]), batch_size=N_CTX * T, chunk_rows=8,
                         buffer_rows=64)
    contexts = {cid for cid, _ in _ids(next(s))}
    assert contexts.isdisjoint(range(man.shards[-1].first_context, man.shards[-1].last_context + 1))
    with pytest.raises(ConfigError, match="holdout_shards"):
        split_shards(man, len(man.shards))


def test_missing_shard_names_the_file_and_harvest(manifest):
    (manifest.parent / "part-00002.parquet").unlink()
    with pytest.raises(DataError, match=r"part-00002\.parquet.*re-run the harvest"):
        ShardSource([manifest])


def test_corrupted_shard_fails_the_checksum(manifest):
    p = manifest.parent / "part-00001.parquet"
    p.write_bytes(p.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(IntegrityError, match="part-00001"):
        ShardSource([manifest])


def test_nan_names_shard_and_row(tmp_path):
    a = _acts()
    a[4, 5, 2] = np.nan  # context 4 lives in shard 1 at row (4-3)*16+5 = 21
    m = write_shards(tmp_path / "nan", a, contexts_per_shard=3, row_group_rows=16)
    s = ActivationStream(ShardSource([m]), batch_size=N_CTX * T, chunk_rows=8, buffer_rows=512)
    with pytest.raises(DataError, match=r"part-00001\.parquet row 21 .*NaN"):
        next(s)


def test_float16_and_aligned_manifests(tmp_path):
    a = _acts()
    m16 = write_shards(tmp_path / "f16", a, dtype="float16", contexts_per_shard=3)
    m32 = write_shards(tmp_path / "f32", a + 100, hook="blocks.0.hook_mlp_out", contexts_per_shard=3)
    s = ActivationStream(ShardSource([m16, m32]), batch_size=10, chunk_rows=8, buffer_rows=64)
    b = next(s)
    assert b.shape == (10, 2 * D)
    torch.testing.assert_close(b[:, D:] - 100, b[:, :D], atol=2e-2, rtol=0)


def test_drop_outliers_removes_exactly_the_rows_above_factor_times_median(tmp_path):
    """Rows planted at 50x the typical norm are dropped from the stream (and counted); a row
    just under the cut stays; the median is the median of the usable rows' norms."""
    from mechflow.dictionaries.data import drop_outlier_rows

    a = _acts()
    a[..., 3] = 10.0  # norms are dominated by this column: ~10-20 for ordinary rows
    planted = {(2, 5), (7, 1), (11, 9)}
    for c, p in planted:
        a[c, p, 3] = 5000.0
    a[5, 6, 3] = 40.0  # large (~3x the median norm of ~14) but under the 5x cut: kept
    manifest = write_shards(tmp_path / "h", a, contexts_per_shard=3, row_group_rows=16)
    src = ShardSource([manifest])
    record = drop_outlier_rows(src, 5.0)
    usable = a[:, 1:].reshape(-1, D)
    median = float(np.median(np.linalg.norm(usable, axis=1)))
    assert record["median_norm"] == pytest.approx(median, rel=1e-6)
    assert record["max_norm"] == pytest.approx(5 * median, rel=1e-6)
    s = ActivationStream(src, batch_size=20, buffer_rows=64, chunk_rows=8, seed=1)
    n_kept = N_CTX * (T - 1) - len(planted)
    rows = []
    while len(rows) < n_kept:
        rows += _ids(next(s))
    epoch = rows[:n_kept]
    assert set(epoch) == {(c, p) for c in range(N_CTX) for p in range(1, T)} - planted
    assert (5, 6) in set(epoch) and np.linalg.norm(a[5, 6]) < record["max_norm"]
    assert src.n_dropped_outliers >= len(planted)
    assert src.outlier_summary() == {**record, "rows_dropped": src.n_dropped_outliers}
    assert drop_outlier_rows(ShardSource([manifest]), None) is None


def test_clip_outliers_shrinks_exactly_the_rows_above_the_cut_to_it_keeping_direction(tmp_path):
    """With clip, every row still arrives once per epoch; rows above factor x median come back with
    norm exactly factor x median and their original direction; every other row is untouched."""
    from mechflow.dictionaries.data import _Chunk, drop_outlier_rows

    a = _acts()
    a[..., 3] = 10.0
    planted = {(2, 5), (7, 1), (11, 9)}
    for c, p in planted:
        a[c, p, 3] = 5000.0
    manifest = write_shards(tmp_path / "h", a, contexts_per_shard=3, row_group_rows=16)
    src = ShardSource([manifest])
    record = drop_outlier_rows(src, 5.0, clip=True)
    assert record["mode"] == "clip"
    acts, meta = src.read_chunks([_Chunk(si, 0, n) for si, n in enumerate(src.rows)])
    assert {tuple(m) for m in meta} == {(c, p) for c in range(N_CTX) for p in range(1, T)}
    stored = a[meta[:, 0], meta[:, 1]]
    norms = np.linalg.norm(acts, axis=1)
    over = np.array([(c, p) in planted for c, p in meta])
    np.testing.assert_allclose(norms[over], record["max_norm"], rtol=1e-5)
    unit = stored[over] / np.linalg.norm(stored[over], axis=1, keepdims=True)
    np.testing.assert_allclose(acts[over] / norms[over, None], unit, atol=1e-6)
    np.testing.assert_array_equal(acts[~over], stored[~over])
    assert src.n_dropped_outliers == len(planted)
    with pytest.raises(ConfigError, match="clip_outliers"):
        drop_outlier_rows(ShardSource([manifest, manifest]), 5.0, clip=True)
