"""Small real models for tests and examples (random weights, exact float64 arithmetic).

Public so that users' own tests can build the same tiny models mechflow's tests use.
"""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_llama(n_layers: int = 2, d_model: int = 32, n_heads: int = 4, n_kv: int = 2, d_mlp: int = 64,
                    d_vocab: int = 50, seed: int = 0, dtype: torch.dtype = torch.float64):
    """A random llama-like HookedTransformer (RMSNorm, rotary, gated SiLU MLP, GQA), float64."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, d_head=d_model // n_heads, n_heads=n_heads,
        n_key_value_heads=n_kv, d_mlp=d_mlp, d_vocab=d_vocab, n_ctx=64, act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=d_model // n_heads,
        gated_mlp=True, final_rms=True, original_architecture="LlamaForCausalLM", seed=seed,
        dtype=dtype, default_prepend_bos=False,
    )
    model = HookedTransformer(cfg, move_to_device=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)  # larger than default init so the model is far from linear
            elif "w" in name.split(".")[-1].lower():
                p.uniform_(0.5, 1.5)
    model.eval()
    return model


def load_configured_model(name: str, config_dir: Path | None = None):
    """Load an embedded model with the settings of its config/model/<name>.yaml (BOS convention)."""
    import yaml

    from mechflow.config import DEFAULT_CONFIG_DIR
    from mechflow.models import load_model_from_cfg

    path = (config_dir or DEFAULT_CONFIG_DIR) / "model" / f"{name}.yaml"
    return load_model_from_cfg(yaml.safe_load(path.read_text()))


def random_token_pairs(seed: int = 0, n: int = 4, pos: int = 6, d_vocab: int = 50):
    """Random clean/corrupted token pairs for a tiny model, with a logit-difference metric
    (a random correct and a different random wrong answer per prompt, at the last position)."""
    from mechflow.attribution.patching import TokenPairs

    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, d_vocab, (n, pos), generator=gen)
    corrupted = torch.randint(0, d_vocab, (n, pos), generator=gen)
    good, bad = torch.randint(0, d_vocab, (n,), generator=gen), torch.randint(0, d_vocab, (n,), generator=gen)
    bad = torch.where(bad == good, (bad + 1) % d_vocab, bad)

    def metric(logits):
        rows = torch.arange(logits.shape[0])
        return logits[rows, -1, good] - logits[rows, -1, bad]

    return TokenPairs(clean, corrupted, metric)


def add_random_biases(model, seed: int, attn: bool = True, mlp: bool = True, unembed: bool = True, scale: float = 0.3):
    """Give a tiny model non-zero b_O / b_out / b_U (in place) so tests exercise the bias terms."""
    gen = torch.Generator().manual_seed(seed)

    def fill(p: torch.Tensor, s: float) -> None:
        p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * s)

    with torch.no_grad():
        for block in model.blocks:
            if attn:
                fill(block.attn.b_O, scale)
            if mlp:
                fill(block.mlp.b_out, scale)
        if unembed:
            fill(model.unembed.b_U, 1.0)
    return model


def write_tiny_task_dataset(path, model_name: str, n: int = 5, pos: int = 6, d_vocab: int = 50, seed: int = 7):
    """A task dataset of ``n`` random clean/corrupted id pairs (``pos`` tokens) for a tiny model
    named ``model_name``, logit-difference metric; the stages' dataset format (`write_dataset`)."""
    from mechflow.tasks.dataset import TaskItem, write_dataset

    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        clean, corrupted = torch.randint(0, d_vocab, (2, pos), generator=gen).tolist()
        good, bad = 3 + i, 20 + i
        items.append(TaskItem(id=f"e{i}", prompt=f"p{i}", corrupted_prompt=f"c{i}", answer=" a", wrong_answer=" b",
                              template=None, clean_ids=clean, corrupted_ids=corrupted, answer_id=good,
                              wrong_id=bad, good_ids=[good], bad_ids=[bad]))
    write_dataset(path, items, {"task": "t", "kind": "jsonl", "metric": "logit_diff",
                                "tokenizer": {"model": model_name}})
    return path


def make_tiny_sae(d_in: int = 32, d_sae: int = 24, kind: str = "topk", seed: int = 0, k: int = 6,
                  dtype: str = "float64"):
    """A random SAELens SAE (``topk`` with ``k`` or ``standard``) with weights far from init, in eval mode."""
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    if kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype=dtype))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, dtype=dtype))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.1)
        sae.W_dec.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.05)
    return sae.eval()


def make_random_transcoders(model, d_sae: int = 16, skip: bool = False, seed: int = 0, scale: float = 1.0):
    """A random per-layer JumpReLU transcoder for every MLP of ``model`` (thresholds 0.3, so a mix
    of features is active); ``scale`` shrinks the decoders (real models: keep the outputs small)."""
    from mechflow.graphs.replacement import LayerTranscoder, TranscoderSet

    g = torch.Generator().manual_seed(seed)
    d, dtype = model.cfg.d_model, model.cfg.dtype

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    layers = {}
    for layer in range(model.cfg.n_layers):
        layers[layer] = LayerTranscoder(
            W_enc=rnd(d, d_sae, std=1 / d ** 0.5), b_enc=rnd(d_sae, std=0.1),
            threshold=torch.full((d_sae,), 0.3, dtype=dtype),
            W_dec=rnd(d_sae, d, std=0.3 * scale), b_dec=rnd(d, std=0.1 * scale),
            W_skip=rnd(d, d, std=0.1) if skip else None)
    return TranscoderSet(layers)
