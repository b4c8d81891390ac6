"""Causal tracing on the tiny llama: exact restore identities and a manual rerun."""

from __future__ import annotations

import pytest
import torch

from mechflow.attribution.causal_tracing import (
    answer_probability,
    causal_trace,
    noise_sigma,
    run_restored,
)
from mechflow.errors import ConfigError

N, POS = 2, 6
ANSWER = torch.tensor([5, 9])
SUBJECT = [[1, 2], [2, 3]]


def _tokens():
    return torch.randint(0, 50, (N, POS), generator=torch.Generator().manual_seed(4))


def _noise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, POS, model.cfg.d_model, generator=g, dtype=torch.float64) * noise_sigma(model)


def _mask(toks):
    from mechflow.attribution.causal_tracing import subject_mask

    return subject_mask(toks, SUBJECT)


def test_restoring_all_positions_at_layer0_recovers_clean_and_nothing_gives_corrupted(tiny_llama):
    toks, metric = _tokens(), answer_probability(ANSWER)
    _, cache = tiny_llama.run_with_cache(toks)
    states = {l: cache[f"blocks.{l}.hook_resid_pre"] for l in range(2)}
    noise = _noise(tiny_llama)
    m = run_restored(tiny_llama, toks, noise, _mask(toks), [{0: list(range(POS))}, {}], states, "resid", metric)
    torch.testing.assert_close(m[0], metric(tiny_llama(toks)), rtol=0, atol=1e-14)
    # Nothing restored = the noised forward pass, computed by hand.
    emb = cache["hook_embed"] + _mask(toks).unsqueeze(-1) * noise
    manual = metric(tiny_llama.run_with_hooks(toks, fwd_hooks=[("hook_embed", lambda a, hook: emb)]))
    torch.testing.assert_close(m[1], manual, rtol=0, atol=1e-14)
    assert (m[0] - m[1]).abs().max() > 1e-4  # the noise really corrupts


def test_trace_grid_matches_manual_restore(tiny_llama):
    toks, metric = _tokens(), answer_probability(ANSWER)
    tr = causal_trace(tiny_llama, toks, SUBJECT, metric, kind="resid", n_samples=2, seed=3, max_batch=5)
    assert tr.effects.shape == (2, POS, N)
    _, cache = tiny_llama.run_with_cache(toks)
    g = torch.Generator().manual_seed(3)
    sigma = noise_sigma(tiny_llama)
    ref = torch.zeros(N, dtype=torch.float64)
    corr = torch.zeros(N, dtype=torch.float64)
    for _ in range(2):
        noise = torch.randn(N, POS, tiny_llama.cfg.d_model, generator=g, dtype=torch.float64) * sigma
        emb = cache["hook_embed"] + _mask(toks).unsqueeze(-1) * noise

        def restore(act, hook):
            act[:, 3] = cache["blocks.1.hook_resid_pre"][:, 3]
            return act

        hooks = [("hook_embed", lambda a, hook, emb=emb: emb)]
        m_c = metric(tiny_llama.run_with_hooks(toks, fwd_hooks=hooks))
        m_r = metric(tiny_llama.run_with_hooks(toks, fwd_hooks=hooks + [("blocks.1.hook_resid_pre", restore)]))
        ref += (m_r - m_c) / 2
        corr += m_c / 2
    torch.testing.assert_close(tr.effects[1, 3], ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(tr.corrupted, corr, rtol=0, atol=1e-14)
    torch.testing.assert_close(tr.clean, metric(tiny_llama(toks)), rtol=0, atol=1e-14)
    assert tr.to_frame().height == 2 * POS


@pytest.mark.parametrize("kind", ["mlp", "attn"])
def test_window_restores_consecutive_layers(tiny_llama, kind):
    toks, metric = _tokens(), answer_probability(ANSWER)
    tr = causal_trace(tiny_llama, toks, SUBJECT, metric, kind=kind, window=2, seed=1)
    _, cache = tiny_llama.run_with_cache(toks)
    hook = {"mlp": "hook_mlp_out", "attn": "hook_attn_out"}[kind]
    states = {l: cache[f"blocks.{l}.{hook}"] for l in range(2)}
    noise = _noise(tiny_llama, 1)
    m = run_restored(tiny_llama, toks, noise, _mask(toks), [{}, {0: [4], 1: [4]}], states, kind, metric)
    torch.testing.assert_close(tr.effects[1, 4], m[1] - m[0], rtol=0, atol=1e-14)  # window 2 at L1 = {0, 1}


def test_bad_arguments(tiny_llama):
    with pytest.raises(ConfigError, match=r"causal_tracing\.kinds"):
        causal_trace(tiny_llama, _tokens(), SUBJECT, answer_probability(ANSWER), kind="z")
    with pytest.raises(ConfigError, match="subject_positions"):
        causal_trace(tiny_llama, _tokens(), [[1], [2], [3]], answer_probability(ANSWER))
