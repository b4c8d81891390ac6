"""Edge-level forward: equals the model, the corrupted run, and an independent TL-hook patcher."""

from __future__ import annotations

import pytest
import torch
from circuit_fixtures import pairs
from mechflow.testing import make_tiny_llama

from mechflow.circuits.forward import graph_forward
from mechflow.circuits.graph import EdgeGraph
from mechflow.circuits.result import tl_edge_patched_logits
from mechflow.errors import ConfigError


@torch.no_grad()
def test_unpatched_and_fully_patched_runs(tiny_llama):
    b = pairs(1)
    g = EdgeGraph.from_cfg(tiny_llama.cfg)
    logits, senders = graph_forward(tiny_llama, b.clean_tokens, record=True)
    torch.testing.assert_close(logits, tiny_llama(b.clean_tokens), rtol=0, atol=1e-12)
    # senders are additive: embedding + all head outputs + all MLP outputs + b_O = final residual
    _, cache = tiny_llama.run_with_cache(b.clean_tokens)
    b_O = sum(blk.attn.b_O for blk in tiny_llama.blocks)
    torch.testing.assert_close(senders.sum(0) + b_O, cache[f"blocks.{g.n_layers - 1}.hook_resid_post"], atol=1e-12, rtol=0)
    _, corr = graph_forward(tiny_llama, b.corrupted_tokens, record=True)
    every, _ = graph_forward(tiny_llama, b.clean_tokens, corrupted=corr, removed=g.valid.clone())
    torch.testing.assert_close(every, tiny_llama(b.corrupted_tokens), rtol=0, atol=1e-12)


@torch.no_grad()
@pytest.mark.parametrize("fraction", [0.05, 0.5])
def test_random_circuits_match_independent_tl_hook_patching(tiny_llama, fraction):
    b = pairs(2)
    g = EdgeGraph.from_cfg(tiny_llama.cfg)
    _, corr = graph_forward(tiny_llama, b.corrupted_tokens, record=True)
    gen = torch.Generator().manual_seed(int(fraction * 100))
    for _ in range(3):
        removed = torch.rand(g.valid.shape, generator=gen) < fraction
        ours, _ = graph_forward(tiny_llama, b.clean_tokens, corrupted=corr, removed=removed)
        ref = tl_edge_patched_logits(tiny_llama, b.clean_tokens, b.corrupted_tokens, removed)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-11)
        assert (ours - tiny_llama(b.clean_tokens)).abs().max() > 1e-3


@torch.no_grad()
def test_gqa_k_edge_affects_only_its_query_head(tiny_llama):
    """Per-query-head k receivers: patching a1.h0<k> changes head 0's output, not its KV sibling's."""
    b = pairs(3)
    g = EdgeGraph.from_cfg(tiny_llama.cfg)
    assert tiny_llama.cfg.n_key_value_heads == 2  # heads 0,1 share KV group 0
    _, corr = graph_forward(tiny_llama, b.corrupted_tokens, record=True)
    _, clean = graph_forward(tiny_llama, b.clean_tokens, record=True)
    removed = g.mask_from_names(["input->a1.h0<k>"])
    _, patched = graph_forward(tiny_llama, b.clean_tokens, corrupted=corr, removed=removed, record=True)
    assert (patched[g.head_sender(1, 0)] - clean[g.head_sender(1, 0)]).abs().max() > 1e-3
    torch.testing.assert_close(patched[g.head_sender(1, 1)], clean[g.head_sender(1, 1)], rtol=0, atol=1e-12)


def test_model_flags_restored_and_postnorm_models_refused(tiny_llama):
    before = (tiny_llama.cfg.use_split_qkv_input, tiny_llama.cfg.ungroup_grouped_query_attention,
              tiny_llama.cfg.use_attn_result, tiny_llama.cfg.use_hook_mlp_in)
    graph_forward(tiny_llama, pairs(0).clean_tokens)
    tl_edge_patched_logits(tiny_llama, pairs(0).clean_tokens, pairs(0).corrupted_tokens,
                           EdgeGraph.from_cfg(tiny_llama.cfg).valid.clone())
    assert before == (tiny_llama.cfg.use_split_qkv_input, tiny_llama.cfg.ungroup_grouped_query_attention,
                      tiny_llama.cfg.use_attn_result, tiny_llama.cfg.use_hook_mlp_in)
    gemma_like = make_tiny_llama(seed=9)
    gemma_like.cfg.use_normalization_before_and_after = True
    with pytest.raises(ConfigError, match="edge-level circuits are not defined.*post-norms"):
        graph_forward(gemma_like, pairs(0).clean_tokens)
