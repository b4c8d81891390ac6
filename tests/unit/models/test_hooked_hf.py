"""`HookedHF` on tiny random transformers models built from a config (no download, no tokenizer)."""

from __future__ import annotations

import pytest
import torch

from mechflow.errors import ModelLoadError
from mechflow.models import HookedHF, require_backend, resolve_backend
from mechflow.models.hf import find_modules


def _starcoder2(n_layers: int = 3):
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    torch.manual_seed(0)
    cfg = Starcoder2Config(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=n_layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           bos_token_id=0, eos_token_id=1)
    return Starcoder2ForCausalLM(cfg).eval()


def _gpt2():  # absolute positions, Conv1D MLP, layers under transformer.h, final norm ln_f
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


@pytest.fixture(scope="module")
def tiny():
    model = _starcoder2()
    model.requires_grad_(False)  # as the registry loads it
    return HookedHF(model)


TOKENS = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))


def _no_hooks_left(model: HookedHF) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.hf.modules())


def test_modules_are_found_generically():
    assert HookedHF(_starcoder2()).modules_found == {"layers": "model.layers", "mlp": "mlp",
                                                    "embed": "model.embed_tokens", "final_norm": "model.norm"}
    gpt2 = HookedHF(_gpt2())
    assert gpt2.modules_found == {"layers": "transformer.h", "mlp": "mlp", "embed": "transformer.wte",
                                  "final_norm": "transformer.ln_f"}
    assert (gpt2.cfg.n_layers, gpt2.cfg.d_model, gpt2.cfg.n_ctx, gpt2.cfg.d_vocab) == (2, 32, 64, 101)
    assert gpt2.hook_modules["blocks.1.ln2.hook_normalized"] == "transformer.h.1.mlp (input)"


def test_cache_points_chain_and_stop_early(tiny):
    with torch.inference_mode():
        logits, cache = tiny.run_with_cache(TOKENS)
        _, early = tiny.run_with_cache(TOKENS, names_filter=lambda n: n.startswith("blocks.1."), stop_at_layer=2)
        embed_only_logits, embed_only = tiny.run_with_cache(TOKENS, names_filter="hook_embed", stop_at_layer=0)
    assert logits.shape == (2, 9, 101) and set(cache) == set(tiny.hook_dict)
    assert torch.equal(cache["hook_embed"], cache["blocks.0.hook_resid_pre"])  # Starcoder2: no position embedding
    for layer in range(2):
        assert torch.equal(cache[f"blocks.{layer}.hook_resid_post"], cache[f"blocks.{layer + 1}.hook_resid_pre"])
        mlp = tiny.hf.model.layers[layer].mlp
        assert torch.equal(mlp(cache[f"blocks.{layer}.ln2.hook_normalized"]), cache[f"blocks.{layer}.hook_mlp_out"])
    assert set(early) == {f"blocks.1.{p}" for p in ("hook_resid_pre", "ln2.hook_normalized", "hook_mlp_out",
                                                     "hook_resid_post")}
    for name, act in early.items():
        assert torch.equal(act, cache[name]), name
    assert embed_only_logits is None and torch.equal(embed_only["hook_embed"], cache["hook_embed"])
    assert _no_hooks_left(tiny)


def test_replacement_hooks_at_inputs_and_outputs(tiny):
    with torch.inference_mode():
        clean = tiny(TOKENS)
        seen = []

        def record(act, hook):
            seen.append(hook.name)  # returning None leaves the activation as it was

        same = tiny.run_with_hooks(TOKENS, fwd_hooks=[("blocks.2.hook_mlp_out", record)])
        zero_mlp = tiny.run_with_hooks(TOKENS, fwd_hooks=[("blocks.2.hook_mlp_out", lambda a, hook: a * 0)])
        # zeroing layer 2's MLP output == feeding the residual with the MLP contribution removed to the head
        _, cache = tiny.run_with_cache(TOKENS, names_filter=["blocks.2.hook_resid_post", "blocks.2.hook_mlp_out"])
        resid = cache["blocks.2.hook_resid_post"] - cache["blocks.2.hook_mlp_out"]
        expected = tiny.hf.lm_head(tiny.hf.model.norm(resid))
        scaled_in = tiny.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.ln2.hook_normalized", lambda a, hook: a * 3)])
    assert seen == ["blocks.2.hook_mlp_out"] and torch.equal(same, clean)
    torch.testing.assert_close(zero_mlp, expected, atol=1e-5, rtol=1e-5)
    assert (scaled_in - clean).abs().max() > 1e-3
    assert _no_hooks_left(tiny)


def test_hooks_are_removed_when_a_hook_raises(tiny):
    def boom(act, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tiny.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.hook_resid_pre", boom)])
    with pytest.raises(KeyError, match="not a hook point of the HF backend"):
        tiny.run_with_cache(TOKENS, names_filter=["blocks.0.attn.hook_z"])
    assert _no_hooks_left(tiny)


def test_module_overrides_and_their_errors():
    model = _starcoder2(2)
    for layer in model.model.layers:  # an MLP under an unusual name: introspection cannot find it
        layer.dense_block = layer.mlp
        del layer.mlp
    with pytest.raises(ModelLoadError, match=r"model\.hf_modules\.mlp"):
        HookedHF(model)
    with pytest.raises(ModelLoadError, match=r"model\.hf_modules\.layers='model\.blocks' is not a module"):
        HookedHF(model, modules={"layers": "model.blocks", "mlp": "dense_block"})
    with pytest.raises(ModelLoadError, match="unknown key"):
        find_modules(model, {"attention": "self_attn"})
    hooked = HookedHF(model, modules={"mlp": "dense_block"})
    assert hooked.hook_modules["blocks.1.hook_mlp_out"] == "model.layers.1.dense_block (output)"


def test_backend_resolution_and_refusal(tmp_path):
    assert resolve_backend("smollm2_135m") == "transformer_lens"
    assert resolve_backend("gpt2") == "transformer_lens"  # TL knows it
    assert resolve_backend("bigcode/starcoder2-3b") == "hf"  # TL lacks the architecture
    assert resolve_backend("smollm2_135m", "hf") == "hf"
    (tmp_path / "config.json").write_text("{}")
    assert resolve_backend(str(tmp_path)) == "hf"
    with pytest.raises(ModelLoadError, match="set model.backend=hf"):
        resolve_backend(str(tmp_path), "transformer_lens")
    require_backend("hf", "harvest", ("transformer_lens", "hf"), "m")
    with pytest.raises(ModelLoadError, match=r"stage 'circuits' needs TransformerLens \(edge patching"):
        require_backend("hf", "circuits", ("transformer_lens",), "m")


def test_load_model_from_cfg_refuses_before_loading(tmp_path):
    from mechflow.errors import ConfigError
    from mechflow.models import load_model_from_cfg

    with pytest.raises(ConfigError, match="model.hf_modules is set but 'smollm2_135m' runs on TransformerLens"):
        load_model_from_cfg({"name": "smollm2_135m", "hf_modules": {"mlp": "mlp"}})

    (tmp_path / "config.json").write_text("{}")  # not a loadable model: the refusal must come first
    with pytest.raises(ModelLoadError, match="stage 'attribution' needs TransformerLens"):
        load_model_from_cfg({"name": str(tmp_path)}, stage="attribution")
