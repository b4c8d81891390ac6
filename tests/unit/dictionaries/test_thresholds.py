"""Data-driven JumpReLU thresholds: exact firing rate, error naming, SAE and transcoder start at the target L0."""

from __future__ import annotations

import json

import pytest
import torch
from test_sae import manifest, small_cfg  # noqa: F401  (module fixture reused)
from test_transcoder import D_IN, D_OUT, synthetic

from mechflow.dictionaries import train_sae
from mechflow.dictionaries.config import TranscoderConfig
from mechflow.dictionaries.data import in_memory_stream
from mechflow.dictionaries.sae import TRAINING_SUMMARY
from mechflow.dictionaries.thresholds import quantile_thresholds
from mechflow.dictionaries.transcoder import JumpReLUTranscoderStack, train_stack
from mechflow.errors import ConfigError


def test_each_latent_fires_on_exactly_the_target_fraction():
    g = torch.Generator().manual_seed(0)
    # latents with very different scales and offsets: one global threshold could not do this
    pre = torch.randn(1000, 3, 50, generator=g) * torch.linspace(0.1, 10, 50) + torch.linspace(0.5, 5, 50)
    th = quantile_thresholds(pre, 5.0, "x.target_l0")
    assert th.shape == (3, 50)
    fires = (pre > th).sum(0)  # 1000 * 5 / 50 = 100 rows above each threshold
    assert torch.equal(fires, torch.full((3, 50), 100))
    assert float((pre > th).sum(-1).float().mean()) == pytest.approx(5.0)


def test_thresholds_never_go_negative_and_bad_targets_name_the_field():
    pre = -torch.rand(400, 8) - 0.1  # never positive: the quantile is negative, clamped to 0
    assert torch.equal(quantile_thresholds(pre, 2.0, "f"), torch.zeros(8))
    with pytest.raises(ConfigError, match=r"sae\.jumprelu_target_l0=8.*d_sae=8"):
        quantile_thresholds(pre, 8, "sae.jumprelu_target_l0")
    with pytest.raises(ConfigError, match=r"transcoder\.target_l0.*too few"):
        quantile_thresholds(pre[:10], 0.1, "transcoder.target_l0")


def test_jumprelu_sae_starts_at_the_target_l0_and_records_it(manifest, tmp_path):  # noqa: F811
    cfg = small_cfg(architecture="jumprelu", jumprelu_target_l0=6, training_tokens=400, n_batches_for_norm_estimate=3)
    summary = train_sae(cfg, manifest=manifest, out_dir=tmp_path / "j")
    init = json.loads((tmp_path / "j" / TRAINING_SUMMARY).read_text())["threshold_init"]
    assert init == summary["threshold_init"]
    assert init["rows"] == 600 and init["target_l0"] == 6
    assert init["l0_at_init"] == pytest.approx(6.0, abs=0.05)  # 600 * 6 / 64 = 56.25 -> 56 rows per latent
    # without the option every threshold starts at jumprelu_init_threshold and L0 is far higher
    plain = train_sae(small_cfg(architecture="jumprelu", training_tokens=400), manifest=manifest,
                      out_dir=tmp_path / "p")
    assert plain["threshold_init"] is None
    assert plain["heldout"]["l0"] > 2 * summary["heldout"]["l0"]


def test_transcoder_starts_at_the_target_l0_per_layer():
    x, y = synthetic(2048, layers=2, cross=True)
    rows = torch.cat([x.reshape(len(x), -1), y.reshape(len(y), -1)], 1)
    cfg = TranscoderConfig(kind="clt", layers=[0, 1], d_sae=64, target_l0=4, n_batches_for_norm_estimate=4,
                           data={"batch_size": 256})
    model = JumpReLUTranscoderStack(2, D_IN, D_OUT, 64, "clt", 0.05, 0.2, seed=0)
    _, extra = train_stack(model, in_memory_stream(rows, 256), cfg, 1)
    assert extra["threshold_init"]["rows"] == 1024
    assert extra["threshold_init"]["l0_at_init_per_layer"] == pytest.approx([4.0, 4.0], abs=0.05)
