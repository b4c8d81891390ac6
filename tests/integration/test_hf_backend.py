"""The HF-hooks backend (``model.backend: hf``, `mechflow.models.hf.HookedHF`).

1. On SmolLM2, HF forward hooks read the same activations as TransformerLens at the same points
   (resid_pre / resid_post / mlp_out within float tolerance; mlp_in = TL's fold_ln value times the
   norm weight), a replacement hook changes the logits as TL's does, and a node-level method that
   needs only hooks (exact patching of MLPs and residual positions) gives TL's numbers.
2. A tiny random Starcoder2 (an architecture TransformerLens lacks; non-gated MLP ``c_fc``/``c_proj``),
   saved to a directory with SmolLM2's tokenizer, goes corpus → harvest → SAE and transcoder training
   → dictionary metrics through the stage functions, offline.
3. A TransformerLens-only stage refuses it with one error naming the stage, writing nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mechflow.errors import ModelLoadError

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2_CFG = yaml.safe_load((ROOT / "config/model/smollm2_135m.yaml").read_text())
PROMPTS = ["When Mary and John went to the store, John gave a drink to",
           "def fibonacci(n):\n    return fibonacci(n - 1) + fibonacci(n - 2)"]
# Float32 tolerance of TL vs HF activations: the two compute the same sums in different orders (TL's
# folded norm weights, einsum attention); the repo's logit parity bound is 1e-3.
ATOL, RTOL = 1e-4, 1e-4
LOGIT_ATOL = 1e-3


def _assert_close(hf: torch.Tensor, tl: torch.Tensor, what: str) -> None:
    # atol scaled by the activation's size: deep residuals reach |x| ~ 1e2 (massive activations)
    scale = max(1.0, tl.abs().max().item())
    torch.testing.assert_close(hf, tl, atol=ATOL * scale, rtol=RTOL, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def smollm2_hf():
    from mechflow.models import load_model_from_cfg

    # n_ctx: the GGUF's llama.context_length is 8192; mechflow's hand-built TL config keeps 2048
    return load_model_from_cfg({**SMOLLM2_CFG, "backend": "hf", "n_ctx": None}, stage="test", backends=("hf",))


@pytest.mark.slow
def test_smollm2_hf_hooks_equal_transformer_lens(smollm2, smollm2_hf):
    hf, tl = smollm2_hf.model, smollm2.model
    card = smollm2_hf.card
    assert (card.backend, smollm2.card.backend) == ("hf", "transformer_lens")
    assert card.source_sha256 == smollm2.card.source_sha256  # the same GGUF
    assert card.hf_modules == {"layers": "model.layers", "mlp": "mlp", "embed": "model.embed_tokens",
                               "final_norm": "model.norm"}
    for key in ("n_layers", "d_model", "d_mlp", "d_vocab", "n_heads", "n_key_value_heads", "d_head"):
        assert getattr(hf.cfg, key) == getattr(tl.cfg, key), key
    layers = [0, 3, 15, 29]
    names = ["hook_embed"] + [f"blocks.{layer}.{p}" for layer in layers for p in
                              ("hook_resid_pre", "hook_resid_post", "hook_mlp_out", "ln2.hook_normalized")]
    for prompt in PROMPTS:
        tokens = smollm2.to_tokens(prompt)
        with torch.inference_mode():
            tl_logits, tl_cache = tl.run_with_cache(tokens, names_filter=names)
            hf_logits, hf_cache = hf.run_with_cache(tokens, names_filter=names)
            _, early = hf.run_with_cache(tokens, names_filter=["blocks.3.hook_resid_post"], stop_at_layer=4)
        assert (hf_logits - tl_logits).abs().max().item() <= LOGIT_ATOL
        assert set(hf_cache) == set(names)
        for name in names:
            if name.endswith("ln2.hook_normalized"):
                continue
            _assert_close(hf_cache[name], tl_cache[name], name)
        for layer in layers:  # mlp_in decision: HF's is the MLP's real input = TL's (fold_ln) value * norm weight
            w = hf.hf.model.layers[layer].post_attention_layernorm.weight
            name = f"blocks.{layer}.ln2.hook_normalized"
            _assert_close(hf_cache[name], tl_cache[name] * w, name)
            # and it is exactly what the HF MLP reads: MLP(mlp_in) == mlp_out
            torch.testing.assert_close(hf.hf.model.layers[layer].mlp(hf_cache[name]),
                                       hf_cache[f"blocks.{layer}.hook_mlp_out"], atol=0, rtol=0)
        assert torch.equal(early["blocks.3.hook_resid_post"], hf_cache["blocks.3.hook_resid_post"])


@pytest.mark.slow
def test_smollm2_hf_replacement_hook_matches_transformer_lens(smollm2, smollm2_hf):
    hf, tl = smollm2_hf.model, smollm2.model
    tokens = smollm2.to_tokens(PROMPTS[0])

    def zero(act, hook):
        assert hook.name == "blocks.3.hook_mlp_out"
        return torch.zeros_like(act)

    def double_resid(act, hook):  # an input-side point: the replacement reaches layer 5's input
        return act * 2

    with torch.inference_mode():
        clean = tl(tokens)
        for hooks in ([("blocks.3.hook_mlp_out", zero)], [("blocks.5.hook_resid_pre", double_resid)]):
            tl_out = tl.run_with_hooks(tokens, return_type="logits", fwd_hooks=hooks)
            hf_out = hf.run_with_hooks(tokens, return_type="logits", fwd_hooks=hooks)
            assert (tl_out - clean).abs().max().item() > 0.1  # the intervention matters...
            assert (hf_out - tl_out).abs().max().item() <= LOGIT_ATOL  # ...and both backends agree on it
        after = hf(tokens)
    assert (after - clean).abs().max().item() <= LOGIT_ATOL  # every hook was removed
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in hf.hf.modules())


@pytest.mark.slow
def test_smollm2_node_patching_through_hf_hooks_matches_transformer_lens(smollm2, smollm2_hf):
    """A node-level method that needs only hooks (exact patching of MLP outputs and residual positions)
    gives TransformerLens's numbers when run on the HF backend's model."""
    from dataclasses import dataclass

    from mechflow.attribution.patching import exact_patching

    clean = smollm2.to_tokens("When Mary and John went to the store, John gave a drink to")
    corrupted = smollm2.to_tokens("When Mary and John went to the store, Mary gave a drink to")
    assert clean.shape == corrupted.shape
    mary, john = (smollm2.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (" Mary", " John"))

    @dataclass
    class Batch:
        clean_tokens: torch.Tensor
        corrupted_tokens: torch.Tensor

        @staticmethod
        def metric(logits):
            return logits[:, -1, mary] - logits[:, -1, john]

    batch = Batch(clean, corrupted)
    layers = [0, 7, 14, 21, 29]
    for component in ("mlp", "resid"):
        tl = exact_patching(smollm2.model, batch, component, layers=layers)
        hf = exact_patching(smollm2_hf.model, batch, component, layers=layers)
        assert tl.abs().nan_to_num().max() > 0.1  # patching matters somewhere
        torch.testing.assert_close(hf, tl, atol=LOGIT_ATOL, rtol=0, equal_nan=True, msg=component)


# -- a tiny architecture TransformerLens lacks -----------------------------------------------------------

@pytest.fixture(scope="module")
def starcoder2_dir(tmp_path_factory):
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    from mechflow.models import load_tokenizer, resolve_backend

    assert resolve_backend("bigcode/starcoder2-3b") == "hf"  # TL's list lacks the architecture
    tokenizer = load_tokenizer("smollm2_135m")
    config = Starcoder2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Starcoder2ForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("starcoder2")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _model_cfg(folder: Path) -> dict:
    return {"name": str(folder), "dtype": "float32", "prepend_bos": True, "bos_token": "<|endoftext|>",
            "n_layers": 2, "d_model": 32, "d_mlp": 64}


@pytest.mark.slow
def test_tiny_starcoder2_harvests_trains_and_evaluates_end_to_end(starcoder2_dir, tmp_path):
    from mechflow.corpus import prepare_corpus, read_contexts
    from mechflow.dictionaries import evaluate_dictionary, evaluate_transcoder, train_sae, train_transcoder
    from mechflow.harvest import harvest, iter_activation_batches
    from mechflow.models import load_model_from_cfg
    from mechflow.workflow.provenance import write_model_card

    model_cfg = _model_cfg(starcoder2_dir)
    corpus_cfg = yaml.safe_load((ROOT / "config/corpus/smoke.yaml").read_text())
    prepare_corpus(corpus_cfg, model_cfg=model_cfg, tokens=tmp_path / "tokens.parquet",
                   corpus_manifest=tmp_path / "corpus.json")
    card = write_model_card(model_cfg, model_card=tmp_path / "model_card.json")
    assert (card.backend, card.architecture, card.n_layers) == ("hf", "Starcoder2ForCausalLM", 2)
    assert card.source_sha256 and len(card.source_sha256) == 64

    hcfg = {**yaml.safe_load((ROOT / "config/harvest/smoke.yaml").read_text()), "layers": [1],
            "hook_points": ["resid_pre", "resid_post", "mlp_in", "mlp_out"]}
    harvest(hcfg, model_cfg=model_cfg, tokens=tmp_path / "tokens.parquet", index=tmp_path / "index.json",
            harvest_dir=tmp_path / "shards")
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["backend"] == "hf"
    assert index["hook_modules"] == {"blocks.1.hook_resid_pre": "model.layers.1 (input)",
                                     "blocks.1.hook_resid_post": "model.layers.1 (output)",
                                     "blocks.1.ln2.hook_normalized": "model.layers.1.mlp (input)",
                                     "blocks.1.hook_mlp_out": "model.layers.1.mlp (output)"}
    manifest = json.loads((tmp_path / "shards/blocks.1.ln2.hook_normalized/_manifest.json").read_text())
    assert (manifest["backend"], manifest["hook_module"], manifest["d"]) == ("hf", "model.layers.1.mlp (input)", 32)

    # Stored activations are the model's: a fresh forward with the layer's own modules reproduces them.
    net = load_model_from_cfg(model_cfg, stage="test", backends=("hf",)).model
    stored = {h: np.concatenate(list(iter_activation_batches(tmp_path / "index.json", 256, hook=h, as_numpy=True)))
              for h in index["hook_modules"]}
    tokens = torch.tensor(read_contexts(tmp_path / "tokens.parquet")[: hcfg["max_contexts"]])
    with torch.inference_mode():
        _, cache = net.run_with_cache(tokens)
        mlp = net.hf.model.layers[1].mlp
        recomputed = mlp(torch.from_numpy(stored["blocks.1.ln2.hook_normalized"])).numpy()
    for hook, values in stored.items():
        np.testing.assert_allclose(values, cache[hook].reshape(-1, 32).numpy(), rtol=1e-5, atol=1e-6, err_msg=hook)
    np.testing.assert_allclose(recomputed, stored["blocks.1.hook_mlp_out"], rtol=1e-5, atol=1e-6)

    sae_cfg = {**yaml.safe_load((ROOT / "config/sae/smoke.yaml").read_text()), "hook": "blocks.1.hook_resid_post",
               "d_sae": 64, "k": 4, "training_tokens": 1024}
    sae_manifest = tmp_path / "shards/blocks.1.hook_resid_post/_manifest.json"
    train_sae(sae_cfg, manifest=sae_manifest, out_dir=tmp_path / "sae", model_cfg=model_cfg)
    metrics = evaluate_dictionary(sae_cfg, dictionary=tmp_path / "sae", manifest=sae_manifest,
                                  tokens=tmp_path / "tokens.parquet", metrics=tmp_path / "sae_metrics.json",
                                  model_cfg=model_cfg)
    assert metrics["ce_contexts"] == 4 and np.isfinite(metrics["ce_spliced"]) and metrics["kl_spliced"] > 0
    assert 0 < metrics["l0"] <= 4 + 1e-9

    tc_cfg = {**yaml.safe_load((ROOT / "config/transcoder/smoke.yaml").read_text()), "layers": [1], "d_sae": 64,
              "training_tokens": 1024}
    tc_manifests = [tmp_path / f"shards/{h}/_manifest.json" for h in
                    ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")]
    train_transcoder(tc_cfg, manifests=tc_manifests, out_dir=tmp_path / "transcoder", model_cfg=model_cfg)
    tc = evaluate_transcoder(tc_cfg, dictionary=tmp_path / "transcoder", manifests=tc_manifests,
                             tokens=tmp_path / "tokens.parquet", metrics=tmp_path / "tc_metrics.json",
                             model_cfg=model_cfg)
    assert tc["ce_contexts"] == 4 and np.isfinite(tc["ce_spliced"]) and np.isfinite(tc["ce_zero"])


@pytest.mark.slow
def test_transformer_lens_only_stage_refuses_hf_model_and_writes_nothing(starcoder2_dir, tmp_path):
    from mechflow.circuits.stage import circuits

    out = tmp_path / "out"
    paths = {k: out / f"{k}.out" for k in ("circuit", "edge_scores", "circuit_prompts", "curve_prompts", "dot",
                                           "figure", "summary")}
    with pytest.raises(ModelLoadError) as err:
        circuits({}, model_cfg=_model_cfg(starcoder2_dir), dataset=tmp_path / "absent.json", **paths)
    message = str(err.value)
    assert "stage 'circuits' needs TransformerLens" in message and "model.backend=hf" in message
    assert "drop stage 'circuits'" in message
    assert not out.exists()
