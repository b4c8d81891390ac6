"""Edge-level forward: equals the model, the corrupted run, and an independent TL-hook patcher."""

from __future__ import annotations

import pytest
import torch
from circuit_fixtures import make_tiny, pairs

from mechflow.circuits.faithfulness import reads_last_position_only
from mechflow.circuits.forward import graph_forward
from mechflow.circuits.graph import EdgeGraph
from mechflow.circuits.result import tl_edge_patched_logits
from mechflow.errors import ConfigError
from mechflow.testing import make_tiny_llama


@torch.no_grad()
def test_unpatched_and_fully_patched_runs(tiny_llama):
    b = pairs(1)
    g = EdgeGraph.from_cfg(tiny_llama.cfg)
    logits, senders = graph_forward(tiny_llama, b.clean_tokens, record=True)
    torch.testing.assert_close(logits, tiny_llama(b.clean_tokens), rtol=0, atol=1e-12)
    # senders are additive: embedding + all head outputs + all MLP outputs + b_O = final residual
    _, cache = tiny_llama.run_with_cache(b.clean_tokens)
    b_O = sum(blk.attn.b_O for blk in tiny_llama.blocks)
    torch.testing.assert_close(senders.sum(0) + b_O, cache[f"blocks.{g.n_layers - 1}.hook_resid_post"],
                               atol=1e-12, rtol=0)
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


def _structured_masks(g: EdgeGraph, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Removal patterns that exercise every branch of the fast path."""
    valid = g.valid

    def rand(p):
        return (torch.rand(valid.shape, generator=gen) < p) & valid

    whole_senders = torch.zeros_like(valid)
    whole_senders[torch.rand(g.n_senders, generator=gen) < 0.5] = True  # shared columns, uniform KV groups
    receivers = torch.zeros_like(valid)
    receivers[:, torch.rand(g.n_receivers, generator=gen) < 0.5] = True  # fully removed receivers
    k_group0 = torch.zeros_like(valid)
    for h in (0, 1):  # k of both query heads of KV group 0 in layer 1: one K for the group
        k_group0[:, g.qkv_receiver(1, "k", h)] = True
    return {"none": torch.zeros_like(valid), "all": valid.clone(), "sparse": rand(0.05), "half": rand(0.5),
            "dense": rand(0.95), "senders": whole_senders & valid, "receivers": receivers & valid,
            "mixed": (whole_senders | rand(0.1)) & valid, "k_group": k_group0 & valid}


@torch.no_grad()
@pytest.mark.parametrize("variant", ["gqa", "mha", "qk_norm"])
def test_fast_path_equals_direct_path(variant):
    """Complement form, shared receiver inputs and K/V per (input, KV group) change nothing."""
    model = {"gqa": lambda: make_tiny_llama(seed=3),  # 4 query heads, 2 KV heads
             "mha": lambda: make_tiny_llama(seed=4, n_kv=4),
             "qk_norm": lambda: make_tiny(5, use_qk_norm=True, original_architecture="Qwen3ForCausalLM")}[variant]()
    b = pairs(4, n=3, pos=7)
    g = EdgeGraph.from_cfg(model.cfg)
    _, corr_fast = graph_forward(model, b.corrupted_tokens, record=True)
    _, corr_direct = graph_forward(model, b.corrupted_tokens, record=True, fast=False)
    torch.testing.assert_close(corr_fast, corr_direct, rtol=0, atol=1e-12)
    for name, removed in _structured_masks(g, torch.Generator().manual_seed(1)).items():
        fast, rec_fast = graph_forward(model, b.clean_tokens, corrupted=corr_fast, removed=removed, record=True)
        direct, rec_direct = graph_forward(model, b.clean_tokens, corrupted=corr_fast, removed=removed, record=True,
                                           fast=False)
        torch.testing.assert_close(fast, direct, rtol=0, atol=1e-11, msg=name)
        torch.testing.assert_close(rec_fast, rec_direct, rtol=0, atol=1e-11, msg=name)
        last, _ = graph_forward(model, b.clean_tokens, corrupted=corr_fast, removed=removed,
                                logit_positions=slice(-1, None))
        torch.testing.assert_close(last, fast[:, -1:], rtol=0, atol=1e-11, msg=name)
    # the patterns are not trivial: the half-removed circuit changes the output
    half, _ = graph_forward(model, b.clean_tokens, corrupted=corr_fast, removed=_structured_masks(
        g, torch.Generator().manual_seed(1))["half"])
    assert (half - model(b.clean_tokens)).abs().max() > 1e-3


def test_metric_position_probe():
    b = pairs(0)
    logits = torch.randn(3, 6, 50, dtype=torch.float64)
    assert reads_last_position_only(b.metric, logits)

    def first(lg):
        return lg[:, 0, 3] - lg[:, 0, 7]

    assert not reads_last_position_only(first, logits)

    def mean_pos(lg):
        return lg[..., 3].mean(1)

    assert not reads_last_position_only(mean_pos, logits)
