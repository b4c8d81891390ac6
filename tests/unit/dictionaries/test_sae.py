"""SAE training through SAELens' SAETrainer from shards: round trip, architectures, resume, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dictionary_shards import write_shards

from mechflow.dictionaries import load_sae, train_sae
from mechflow.dictionaries.sae import CURVES_PNG, TRAINING_SUMMARY
from mechflow.errors import ConfigError, ModelLoadError

D, N_FEAT = 16, 48


def sparse_acts(n_ctx=40, T=32, seed=0) -> np.ndarray:
    """Activations that are sparse sums of N_FEAT fixed directions (learnable by an SAE)."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(N_FEAT, D)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    codes = (rng.random((n_ctx * T, N_FEAT)) < 2 / N_FEAT) * rng.uniform(1, 3, (n_ctx * T, N_FEAT))
    return (codes @ dirs).astype(np.float32).reshape(n_ctx, T, D)


def small_cfg(**kw):
    cfg = {"hook": None, "architecture": "topk", "d_sae": 64, "k": 4, "training_tokens": 30000, "lr": 1e-2,
           "log_every": 5, "dead_feature_window": 50,
           "data": {"batch_size": 200, "buffer_rows": 512, "chunk_rows": 64, "holdout_shards": 2, "prefetch": 0},
           "eval": {"max_tokens": 5000, "dead_min_tokens": 100, "ce_contexts": 0}}
    for k, v in kw.items():
        if isinstance(v, dict):
            cfg[k] = {**cfg.get(k, {}), **v}
        else:
            cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("h") / "shards", sparse_acts(), contexts_per_shard=5,
                        row_group_rows=64)


def test_topk_trains_saves_and_loads_with_saelens(manifest, tmp_path):
    out = tmp_path / "sae"
    summary = train_sae(small_cfg(), manifest=manifest, out_dir=out)
    for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors", TRAINING_SUMMARY, CURVES_PNG,
                 "curves.csv"):
        assert (out / name).exists(), name
    assert not list(tmp_path.glob(".sae.*"))  # no temp/checkpoint folders left behind
    saved = json.loads((out / TRAINING_SUMMARY).read_text())
    assert saved["manifest_sha256"] and saved["holdout_shards"] == ["part-00006.parquet", "part-00007.parquet"]
    assert summary["training_tokens"] >= 30000
    assert summary["heldout"]["explained_variance"] > 0.7  # sparse synthetic data is learnable
    assert 3.5 <= summary["heldout"]["l0"] <= 4.0 + 1e-9

    from sae_lens import SAE
    from safetensors.torch import load_file

    sae = SAE.load_from_disk(out)
    assert sae.cfg.architecture() == "topk" and sae.cfg.metadata.mechflow_manifest_sha256 == saved["manifest_sha256"]
    weights = load_file(out / "sae_weights.safetensors")
    for name, p in sae.state_dict().items():
        assert torch.equal(p, weights[name]), name
    x = torch.from_numpy(sparse_acts(n_ctx=2, seed=1).reshape(-1, D))
    again = load_sae(out)
    torch.testing.assert_close(sae(x), again(x), rtol=0, atol=0)
    # the saved model reproduces the held-out EV measured at the end of training
    assert np.isfinite(summary["final_train"]["explained_variance"])


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu", "standard", "gated", "matryoshka_batchtopk"])
def test_every_architecture_trains_and_loads(arch, manifest, tmp_path):
    extra = {"l1_coefficient": 0.5} if arch in ("standard", "gated") else {}
    if arch == "matryoshka_batchtopk":
        extra["matryoshka_widths"] = [16, 64]
    summary = train_sae(small_cfg(architecture=arch, training_tokens=2000, **extra), manifest=manifest,
                        out_dir=tmp_path / arch)
    from sae_lens import SAE

    sae = SAE.load_from_disk(tmp_path / arch)
    x = torch.randn(5, D)
    assert sae(x).shape == (5, D)
    assert np.isfinite(summary["heldout"]["explained_variance"])


def test_resume_from_checkpoint_matches_uninterrupted(manifest, tmp_path, monkeypatch):
    cfg = small_cfg(training_tokens=4000, n_checkpoints=1)
    ref = train_sae(cfg, manifest=manifest, out_dir=tmp_path / "ref")
    # Interrupt a second run right after its checkpoint, then rerun: it must resume there.
    from sae_lens.training.sae_trainer import SAETrainer

    orig = SAETrainer.save_checkpoint

    def crash_after_checkpoint(self, *a, **k):
        orig(self, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(SAETrainer, "save_checkpoint", crash_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_sae(cfg, manifest=manifest, out_dir=tmp_path / "run")
    monkeypatch.setattr(SAETrainer, "save_checkpoint", orig)
    assert not (tmp_path / "run").exists()
    resumed = train_sae(cfg, manifest=manifest, out_dir=tmp_path / "run")
    assert resumed["resumed_from"] is not None
    from safetensors.torch import load_file

    a = load_file(tmp_path / "ref" / "sae_weights.safetensors")
    b = load_file(tmp_path / "run" / "sae_weights.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert resumed["data_state"] == ref["data_state"]
    # a checkpoint of another training config is not resumed (bookkeeping such as log_every may differ)
    monkeypatch.setattr(SAETrainer, "save_checkpoint", crash_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_sae(cfg, manifest=manifest, out_dir=tmp_path / "other")
    monkeypatch.setattr(SAETrainer, "save_checkpoint", orig)
    other = train_sae({**cfg, "lr": cfg["lr"] / 2}, manifest=manifest, out_dir=tmp_path / "other")
    assert other["resumed_from"] is None


def test_d_mismatch_and_hook_mismatch_are_config_errors(manifest, tmp_path):
    with pytest.raises(ConfigError, match=r"sae\.d_in=32 .*d=16"):
        train_sae(small_cfg(d_in=32), manifest=manifest, out_dir=tmp_path / "x")
    with pytest.raises(ConfigError, match=r"sae\.hook"):
        train_sae(small_cfg(hook="blocks.3.hook_resid_post"), manifest=manifest, out_dir=tmp_path / "x")
    with pytest.raises(ConfigError, match=r"sae\.d_sae"):
        train_sae(small_cfg(d_sae=0), manifest=manifest, out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_pretrained_sae_offline_fails_clearly(monkeypatch):
    from mechflow.dictionaries import load_pretrained_sae

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_pretrained_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    with pytest.raises(ConfigError, match="not in SAELens"):
        load_pretrained_sae("no-such-release", "x")


def test_drop_outliers_keeps_sink_rows_out_of_training_and_records_it(tmp_path):
    """Rows planted at a huge norm are dropped from the training stream (counted in training.json)
    while the held-out metrics still see them (EV with outliers is reported by evaluation)."""
    acts = sparse_acts()
    acts[::4, 3] *= 0
    acts[::4, 3, 0] = 1e4  # a 'sink' position in every 4th context: far above 5x the median norm
    manifest = write_shards(tmp_path / "shards", acts, contexts_per_shard=5, row_group_rows=64)
    summary = train_sae(small_cfg(training_tokens=2000, data={"drop_outliers": 5.0}), manifest=manifest,
                        out_dir=tmp_path / "sae")
    record = summary["outlier_filter"]
    assert record["factor"] == 5.0 and record["max_norm"] == pytest.approx(5 * record["median_norm"])
    assert record["max_norm"] < 1e4 and record["rows_dropped"] >= 1
    plain = train_sae(small_cfg(training_tokens=2000), manifest=manifest, out_dir=tmp_path / "plain")
    assert plain["outlier_filter"] is None
    clipped = train_sae(small_cfg(training_tokens=2000, data={"clip_outliers": 5.0}), manifest=manifest,
                        out_dir=tmp_path / "clipped")
    assert clipped["outlier_filter"]["mode"] == "clip" and clipped["outlier_filter"]["rows_dropped"] >= 1
    with pytest.raises(ConfigError, match=r"sae\.data\.drop_outliers and sae\.data\.clip_outliers"):
        train_sae(small_cfg(training_tokens=2000, data={"clip_outliers": 5.0, "drop_outliers": 5.0}),
                  manifest=manifest, out_dir=tmp_path / "both")
    assert not (tmp_path / "both").exists()
