"""Helpers for circuit tests: random token pairs on the tiny llama and a linear-tail variant.

Not a conftest: `from mechflow.testing import` must reach tests/conftest.py.
"""

from __future__ import annotations

import torch

from mechflow.attribution.patching import TokenPairs
from mechflow.circuits.result import LogitDiffSpec
from mechflow.testing import make_tiny_llama

CORRECT, INCORRECT = [3, 11, 29, 17, 5], [7, 2, 41, 30, 44]


def spec(n: int = 3) -> LogitDiffSpec:
    return LogitDiffSpec(correct_ids=CORRECT[:n], incorrect_ids=INCORRECT[:n])


def pairs(seed: int = 0, n: int = 3, pos: int = 6) -> TokenPairs:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 50, (n, pos), generator=g)
    corr = torch.randint(0, 50, (n, pos), generator=g)
    return TokenPairs(clean, corr, spec(n).build())


def make_linear_tail():
    """ln_final replaced by the identity: the metric is linear in the logits receiver's input."""
    model = make_tiny_llama(seed=5)
    model.ln_final = torch.nn.Identity()
    return model


def make_tiny(seed: int = 0, **overrides):
    """A random float64 llama-like HookedTransformer with config ``overrides`` (`make_tiny_llama`'s init).

    ``make_tiny(use_normalization_before_and_after=True, use_qk_norm=True, n_key_value_heads=1,
    original_architecture="Gemma3ForCausalLM")`` is a tiny Gemma-3 (post-attention / post-MLP norms).
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = {"n_layers": 2, "d_model": 32, "d_head": 8, "n_heads": 4, "n_key_value_heads": 2, "d_mlp": 64,
           "d_vocab": 50, "n_ctx": 64, "act_fn": "silu", "normalization_type": "RMS",
           "positional_embedding_type": "rotary", "rotary_dim": 8, "gated_mlp": True, "final_rms": True,
           "original_architecture": "LlamaForCausalLM", "seed": seed, "dtype": torch.float64,
           "default_prepend_bos": False}
    model = HookedTransformer(HookedTransformerConfig(**{**cfg, **overrides}), move_to_device=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
            elif "w" in name.split(".")[-1].lower():
                p.uniform_(0.5, 1.5)
    model.eval()
    return model


def make_tiny_gemma(seed: int = 0):
    """Tiny Gemma-3-like model: post-norms after attention and MLP, QK-norm, one KV head."""
    return make_tiny(seed, n_key_value_heads=1, act_fn="gelu_pytorch_tanh", use_normalization_before_and_after=True,
                     use_qk_norm=True, original_architecture="Gemma3ForCausalLM")
