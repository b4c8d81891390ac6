"""Composition scores against dense d_model x d_model matrix products and TransformerLens."""

from __future__ import annotations

import pytest
import torch

from mechflow.attribution.composition import (
    composition_frame,
    composition_scores,
    dense_matrices,
)
from mechflow.errors import ConfigError


def _dense_reference(model, mode, include_norm_weights):
    d = dense_matrices(model, include_norm_weights)
    ov, qk = d["OV"].detach(), d["QK"].detach()
    L, H = ov.shape[:2]
    ref = torch.zeros(L, H, L, H, dtype=torch.float64)
    for la in range(L):
        for ha in range(H):
            for lb in range(la + 1, L):
                for hb in range(H):
                    left = ov[la, ha]
                    right = {"Q": qk[lb, hb], "V": ov[lb, hb]}.get(mode)
                    prod = left @ right if mode != "K" else qk[lb, hb] @ left.T
                    r = right if right is not None else qk[lb, hb]
                    ref[la, ha, lb, hb] = prod.norm() / left.norm() / r.norm()
    return ref


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
@pytest.mark.parametrize("norm_weights", [True, False])
def test_composition_equals_dense_products(tiny_llama, mode, norm_weights):
    got = composition_scores(tiny_llama, mode, include_norm_weights=norm_weights)
    ref = _dense_reference(tiny_llama, mode, norm_weights)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert got[1].abs().sum() == 0 and got[0, :, 1].min() > 0


def test_dense_matrices_use_the_kv_group_and_norm_weights(tiny_llama):
    attn, w = tiny_llama.blocks[1].attn, tiny_llama.blocks[1].ln1.w
    d = dense_matrices(tiny_llama, True)
    group = 3 // (tiny_llama.cfg.n_heads // tiny_llama.cfg.n_key_value_heads)  # query head 3 -> KV head 1
    manual_qk = (w[:, None] * attn.W_Q[3]) @ (w[:, None] * attn._W_K[group]).T
    torch.testing.assert_close(d["QK"][1, 3], manual_qk)
    torch.testing.assert_close(d["OV"][1, 3], (w[:, None] * attn._W_V[group]) @ attn.W_O[3])


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_without_norm_weights_matches_transformer_lens(tiny_llama, mode):
    ref = tiny_llama.all_composition_scores(mode).detach()
    torch.testing.assert_close(composition_scores(tiny_llama, mode, include_norm_weights=False), ref,
                               rtol=1e-8, atol=1e-10)


def test_frame_and_bad_mode(tiny_llama):
    s = composition_scores(tiny_llama, "K")
    frame = composition_frame(s, "K")
    assert frame.height == 4 * 4 and set(frame["method"]) == {"k_composition"}
    top = composition_frame(s, "K", top_k=3)
    assert top["score"].to_list() == sorted(frame["score"].to_list(), reverse=True)[:3]
    with pytest.raises(ConfigError, match="composition mode"):
        composition_scores(tiny_llama, "O")
