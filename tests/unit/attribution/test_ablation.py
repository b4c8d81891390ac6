"""Zero / mean / resample ablation against manual reruns on the tiny llama."""

from __future__ import annotations

import pytest
import torch

from mechflow.attribution.ablation import ablate_components, ablation_frame, derangement
from mechflow.errors import ConfigError

N, POS = 3, 6


def metric(logits):
    return logits[:, -1, 2] - logits[:, -1, 8]


def _tokens(seed=0, n=N):
    return torch.randint(0, 50, (n, POS), generator=torch.Generator().manual_seed(seed))


def _rerun(model, toks, hook_name, fn):
    return metric(model.run_with_hooks(toks, fwd_hooks=[(hook_name, fn)])) - metric(model(toks))


def test_zero_ablation_of_a_head_equals_manual_rerun(tiny_llama):
    toks = _tokens()
    got = ablate_components(tiny_llama, toks, metric, "head", "zero", max_batch=7, per_prompt=True)
    assert got.shape == (2, 4, N)

    def zero_head(act, hook):
        act[:, :, 3] = 0.0
        return act

    torch.testing.assert_close(got[1, 3], _rerun(tiny_llama, toks, "blocks.1.attn.hook_z", zero_head),
                               rtol=0, atol=1e-12)
    assert got.abs().min() > 0


def test_mean_ablation_of_an_mlp_uses_per_position_reference_mean(tiny_llama):
    toks, ref = _tokens(1), _tokens(2, n=5)
    got = ablate_components(tiny_llama, toks, metric, "mlp", "mean", reference_tokens=ref, per_prompt=True)
    _, cache = tiny_llama.run_with_cache(ref)
    mean = cache["blocks.0.hook_mlp_out"].mean(0)  # [pos, d_model]

    def mean_mlp(act, hook):
        return mean.expand_as(act).clone()

    torch.testing.assert_close(got[0], _rerun(tiny_llama, toks, "blocks.0.hook_mlp_out", mean_mlp), rtol=0, atol=1e-12)


def test_resample_ablation_uses_a_seeded_derangement(tiny_llama):
    toks = _tokens(3, n=4)
    got = ablate_components(tiny_llama, toks, metric, "head", "resample", seed=5, per_prompt=True)
    perm = derangement(4, 5)
    assert not torch.any(perm == torch.arange(4))
    _, cache = tiny_llama.run_with_cache(toks)

    def resample(act, hook):
        act[:, :, 1] = cache["blocks.0.attn.hook_z"][perm][:, :, 1]
        return act

    torch.testing.assert_close(got[0, 1], _rerun(tiny_llama, toks, "blocks.0.attn.hook_z", resample),
                               rtol=0, atol=1e-12)
    again = ablate_components(tiny_llama, toks, metric, "head", "resample", seed=5, per_prompt=True)
    assert torch.equal(got, again)
    frame = ablation_frame(got.mean(-1), "head", "resample")
    assert frame.height == 8 and set(frame["method"]) == {"resample_ablation"}


def test_bad_arguments(tiny_llama):
    with pytest.raises(ConfigError, match=r"analysis\.ablations"):
        ablate_components(tiny_llama, _tokens(), metric, "head", "noise")
    with pytest.raises(ConfigError, match="reference_tokens"):
        ablate_components(tiny_llama, _tokens(), metric, "mlp", "mean",
                          reference_tokens=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ConfigError, match="at least 2 prompts"):
        ablate_components(tiny_llama, _tokens(n=1), metric, "mlp", "resample")
