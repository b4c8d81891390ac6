"""Logit lens and direct logit attribution on the tiny llama (float64): exact identities."""

from __future__ import annotations

import pytest
import torch

from mechflow.attribution.lens import (
    FRAME_COLUMNS,
    direct_logit_attribution,
    logit_lens,
)
from mechflow.testing import add_random_biases, make_tiny_llama

N, POS = 3, 7


@pytest.fixture(scope="module")
def biased_llama():
    """Tiny llama with non-zero b_O, b_out and b_U, so bias terms are exercised."""
    model = make_tiny_llama(seed=3)
    add_random_biases(model, seed=1)
    return model


def _tokens(seed=0):
    return torch.randint(0, 50, (N, POS), generator=torch.Generator().manual_seed(seed))


def test_logit_lens_last_layer_equals_model_logits(biased_llama):
    toks = _tokens()
    ans, wrong = torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])
    res = logit_lens(biased_llama, toks, ans, wrong, keep_logits=True)
    logits = biased_llama(toks)[:, -1]
    assert res.labels == ["resid_pre 0", "resid_post 0", "resid_post 1"]
    torch.testing.assert_close(res.logits[-1], logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.logit_diff[-1], logits[torch.arange(N), ans] - logits[torch.arange(N), wrong],
                               rtol=0, atol=1e-12)


def test_logit_lens_uses_each_layers_own_norm_scale(biased_llama):
    toks = _tokens(1)
    res = logit_lens(biased_llama, toks, torch.tensor([1, 2, 3]), keep_logits=True)
    _, cache = biased_llama.run_with_cache(toks)
    x = cache["blocks.0.hook_resid_post"][:, -1]
    rms = (x.pow(2).mean(-1, keepdim=True) + biased_llama.cfg.eps).sqrt()
    manual = (x / rms * biased_llama.ln_final.w) @ biased_llama.W_U + biased_llama.b_U
    torch.testing.assert_close(res.logits[1], manual, rtol=0, atol=1e-12)
    assert res.to_frame().columns[:5] == list(FRAME_COLUMNS)


def test_dla_sums_to_logit_diff_exactly(biased_llama):
    toks = _tokens(2)
    ans, wrong = torch.tensor([10, 11, 12]), torch.tensor([20, 21, 22])
    dla = direct_logit_attribution(biased_llama, toks, ans, wrong)
    logits = biased_llama(toks)[:, -1]
    ref = logits[torch.arange(N), ans] - logits[torch.arange(N), wrong]
    torch.testing.assert_close(dla.logit_diff, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(dla.total(), ref, rtol=0, atol=1e-10)
    assert dla.heads.shape == (2, 4, N) and dla.mlps.shape == (2, N)
    assert dla.attn_bias.abs().min() > 0 and dla.constant.abs().min() > 0  # biases really contribute


def test_dla_of_one_head_matches_manual_projection(biased_llama):
    toks = _tokens(3)
    dla = direct_logit_attribution(biased_llama, toks, 5, 9)
    _, cache = biased_llama.run_with_cache(toks)
    z = cache["blocks.1.attn.hook_z"][:, -1, 2]  # [n, d_head]
    out = z @ biased_llama.blocks[1].attn.W_O[2]
    s = cache["ln_final.hook_scale"][:, -1]
    direction = biased_llama.W_U[:, 5] - biased_llama.W_U[:, 9]
    manual = (out / s * biased_llama.ln_final.w) @ direction
    torch.testing.assert_close(dla.heads[1, 2], manual, rtol=0, atol=1e-12)
    frame = dla.to_frame()
    assert frame.height == 1 + 2 * (4 + 2) + 1
    assert abs(frame["score"].sum() - float(dla.logit_diff.mean())) < 1e-9


def test_plots_write_png_files(tmp_path, biased_llama):
    from mechflow.attribution.plots import (
        plot_head_grid,
        plot_logit_lens,
        plot_token_saliency,
    )

    toks = _tokens(4)
    lens = logit_lens(biased_llama, toks, 1, 2)
    dla = direct_logit_attribution(biased_llama, toks, 1, 2)
    paths = [plot_logit_lens(lens.logit_diff, lens.labels, tmp_path / "lens.png"),
             plot_head_grid(dla.heads.mean(-1), tmp_path / "sub" / "heads.png", title="DLA"),
             plot_token_saliency(torch.randn(N, POS, dtype=torch.float64), [[str(t) for t in r] for r in toks.tolist()],
                                 tmp_path / "sal.png")]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(x.name for x in tmp_path.rglob("*") if x.is_file()) == ["heads.png", "lens.png", "sal.png"]
