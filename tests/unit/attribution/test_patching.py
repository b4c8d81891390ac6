"""Exact activation patching on the float64 tiny llama: batching, directions, analytic cases."""

from __future__ import annotations

import pytest
import torch

from mechflow.attribution.patching import TokenPairs, exact_patching, hook_name, patch_whole_layer
from mechflow.errors import ConfigError


def logit_diff(a: int = 3, b: int = 7):
    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, a] - logits[:, -1, b]
    return metric


def make_batch(seed: int = 1, n: int = 3, pos: int = 6, vocab: int = 50, one_position: int | None = None):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (n, pos), generator=g)
    corr = clean.clone()
    if one_position is None:
        corr = torch.randint(0, vocab, (n, pos), generator=g)
    else:
        corr[:, one_position] = (clean[:, one_position] + 1 + torch.arange(n)) % vocab
    return TokenPairs(clean, corr, logit_diff())


def _one_patch(model, batch, component, layer, sub, direction="noising"):
    """Brute-force reference: one forward per patch, no batching."""
    base, src_tokens = (batch.clean_tokens, batch.corrupted_tokens) if direction == "noising" else (
        batch.corrupted_tokens, batch.clean_tokens)
    name = hook_name(component, layer)
    _, cache = model.run_with_cache(src_tokens, names_filter=lambda n: n == name)
    src = cache[name]

    def hook(act, hook):
        act = act.clone()
        if component == "head":
            act[:, :, sub] = src[:, :, sub]
        elif component == "mlp":
            act = src.clone()
        else:
            act[:, sub] = src[:, sub]
        return act

    with torch.no_grad():
        return (batch.metric(model.run_with_hooks(base, fwd_hooks=[(name, hook)])) - batch.metric(model(base))).mean()


@pytest.mark.parametrize("direction", ["noising", "denoising"])
@pytest.mark.parametrize("component", ["head", "mlp", "resid"])
def test_batched_patching_matches_one_forward_per_patch(tiny_llama, component, direction):
    batch = make_batch()
    got = exact_patching(tiny_llama, batch, component, direction, max_batch=7)  # chunks of 2 copies
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in got.shape]).reshape(-1, got.ndim):
        idx = tuple(int(i) for i in idx)
        ref = _one_patch(tiny_llama, batch, component, idx[0], idx[1] if len(idx) > 1 else None, direction)
        assert got[idx].item() == pytest.approx(ref.item(), abs=1e-10)
    assert got.abs().max() > 1e-3  # the random model reacts to patching


def test_embedding_position_patch_equals_full_corrupted_run(tiny_llama):
    """resid_pre of layer 0 is the embedding: when prompts differ at one position only, patching that
    position IS the corrupted run, and patching any other position changes nothing."""
    batch = make_batch(one_position=2)
    eff = exact_patching(tiny_llama, batch, "resid", "noising")
    with torch.no_grad():
        full = (batch.metric(tiny_llama(batch.corrupted_tokens)) - batch.metric(tiny_llama(batch.clean_tokens))).mean()
    assert eff[0, 2].item() == pytest.approx(full.item(), abs=1e-10)
    assert eff[0, [0, 1, 3, 4, 5]].abs().max() < 1e-12
    assert abs(full.item()) > 1e-3


def test_per_prompt_mean_and_whole_layer(tiny_llama):
    batch = make_batch()
    pp = exact_patching(tiny_llama, batch, "mlp", per_prompt=True)
    assert pp.shape == (2, 3)
    torch.testing.assert_close(pp.mean(-1), exact_patching(tiny_llama, batch, "mlp"))
    # one MLP per layer: patching the whole layer's hook is the same intervention
    torch.testing.assert_close(patch_whole_layer(tiny_llama, batch, "mlp", 1), pp[1])


def test_bad_arguments_raise_config_error(tiny_llama):
    batch = make_batch()
    with pytest.raises(ConfigError, match="direction"):
        exact_patching(tiny_llama, batch, "head", "sideways")
    with pytest.raises(ConfigError, match="component"):
        exact_patching(tiny_llama, batch, "neuron")
    with pytest.raises(ConfigError, match="corrupted_tokens"):
        TokenPairs(batch.clean_tokens, batch.corrupted_tokens[:, :-1], batch.metric)


def test_layer_subset_matches_full_and_leaves_nan(tiny_llama):
    batch = make_batch(seed=2)
    full = exact_patching(tiny_llama, batch, "head")
    sub = exact_patching(tiny_llama, batch, "head", layers=[1], max_batch=5)
    torch.testing.assert_close(sub[1], full[1])
    assert torch.isnan(sub[0]).all()
