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


def _one_saelens_step(scale: float, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from mechflow.dictionaries.config import SAEConfig
    from mechflow.dictionaries.sae import build_training_sae, give_thresholds_their_own_lr

    sae = build_training_sae(SAEConfig(architecture="jumprelu", d_sae=32, normalize_activations="none",
                                       jumprelu_bandwidth=0.5), d_in=x.shape[1])
    tcfg = SAETrainerConfig(total_training_samples=len(x) * 4, train_batch_size_samples=len(x), lr=1e-3, lr_end=1e-4,
                            lr_scheduler_name="constant", lr_warm_up_steps=0, lr_decay_steps=0, adam_beta1=0.9,
                            adam_beta2=0.999, device="cpu", dead_feature_window=10, feature_sampling_window=10,
                            n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
                            logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=1)
    trainer = SAETrainer(tcfg, sae, iter([x] * 4))
    if scale != 1.0:
        give_thresholds_their_own_lr(trainer, scale)
    before = {k: v.detach().clone() for k, v in sae.named_parameters()}
    trainer.step(x)
    return {k: v.detach() - before[k] for k, v in sae.named_parameters()}


def test_saelens_thresholds_learn_at_their_own_rate():
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) * 0.3
    plain, scaled = _one_saelens_step(1.0, x), _one_saelens_step(10.0, x)
    assert plain["threshold"].abs().max() > 1e-4  # the step reached the thresholds
    torch.testing.assert_close(scaled["threshold"], 10 * plain["threshold"])
    for name in plain:  # everything else takes the very same step
        if name != "threshold":
            torch.testing.assert_close(scaled[name], plain[name], rtol=0, atol=0)


def test_transcoder_thresholds_learn_at_their_own_rate():
    x, y = synthetic(1024)
    rows = torch.cat([x.reshape(len(x), -1), y.reshape(len(y), -1)], 1)
    moved = {}
    for scale in (1.0, 10.0):
        cfg = TranscoderConfig(kind="per_layer", layers=[0], d_sae=64, threshold_lr_scale=scale, lr=1e-3,
                               sparsity_mode="step", sparsity_coefficient=0.1, jumprelu_bandwidth=0.5,
                               n_batches_for_norm_estimate=1, data={"batch_size": 256})
        model = JumpReLUTranscoderStack(1, D_IN, D_OUT, 64, "per_layer", 0.5, 0.5, seed=0)
        start = {k: v.detach().clone() for k, v in model.named_parameters()}
        train_stack(model, in_memory_stream(rows, 256), cfg, 1)
        moved[scale] = {k: v.detach() - start[k] for k, v in model.named_parameters()}
    assert moved[1.0]["threshold"].abs().max() > 1e-4
    torch.testing.assert_close(moved[10.0]["threshold"], 10 * moved[1.0]["threshold"])
    for name in moved[1.0]:  # thresholds are not rescaled at the end; the rest is, identically in both runs
        if name != "threshold":
            torch.testing.assert_close(moved[10.0][name], moved[1.0][name], rtol=0, atol=0)
