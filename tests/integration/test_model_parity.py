"""The embedded models load into TransformerLens with logits equal to Hugging Face's."""

from __future__ import annotations

import pytest
import torch

from mechflow.errors import ModelLoadError
from mechflow.models import load_hf_reference, load_model

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The Eiffel Tower is located in the city of",
    "def fibonacci(n):\n    return",
]


def _max_logit_diff(loaded, name: str) -> float:
    hf_model, tokenizer = load_hf_reference(name)
    worst = 0.0
    for prompt in PROMPTS:
        ids = loaded.to_tokens(prompt)
        with torch.no_grad():
            hf_logits = hf_model(ids).logits
            tl_logits = loaded.model(ids)
        assert hf_logits.shape == tl_logits.shape
        worst = max(worst, (hf_logits - tl_logits).abs().max().item())
    del hf_model
    return worst


@pytest.mark.slow
def test_smollm2_tl_logits_match_hf(smollm2):
    card = smollm2.card
    assert (card.n_layers, card.n_heads, card.n_key_value_heads, card.d_model, card.d_mlp) == (30, 9, 3, 576, 1536)
    assert card.source_sha256 and len(card.source_sha256) == 64
    assert _max_logit_diff(smollm2, "smollm2_135m") <= 1e-3


@pytest.mark.slow
def test_gemma3_tl_logits_match_hf(gemma3):
    card = gemma3.card
    assert (card.n_layers, card.n_heads, card.n_key_value_heads, card.d_model) == (18, 4, 1, 640)
    assert _max_logit_diff(gemma3, "gemma3_270m") <= 1e-3


@pytest.mark.slow
def test_smollm2_answers_ioi(smollm2):
    ids = smollm2.to_tokens(PROMPTS[0])
    with torch.no_grad():
        top = smollm2.model(ids)[0, -1].argmax().item()
    assert smollm2.tokenizer.decode([top]).strip() == "Mary"


@pytest.mark.slow
def test_load_model_is_cached_per_process(smollm2):
    from mechflow.testing import load_configured_model

    assert load_configured_model("smollm2_135m") is smollm2  # memoised: no second 20 s load in the same process
    other_bos = load_model("smollm2_135m", smollm2.card.dtype, False, None)
    assert other_bos.model is smollm2.model  # weights shared across BOS settings


def test_hub_name_offline_fails_with_embedded_model_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_model("gpt2")
    message = str(err.value)
    assert "smollm2_135m" in message and "gemma3_270m" in message and "offline" in message.lower()


@pytest.mark.slow
def test_weight_cache_reproduces_the_converted_model_exactly(smollm2):
    from mechflow.models import registry

    cache = registry._cache_dir("smollm2_135m", registry.smollm2_gguf_path(), smollm2.card.dtype)
    if not (cache / "model.safetensors").exists():
        registry._write_cache(cache, smollm2.model, smollm2.tokenizer)
    cached_model, cached_tokenizer = registry._read_cache(cache)
    ids = smollm2.to_tokens(PROMPTS[1])
    with torch.no_grad():
        assert torch.equal(cached_model(ids), smollm2.model(ids))
    assert cached_tokenizer(PROMPTS[1])["input_ids"] == smollm2.tokenizer(PROMPTS[1])["input_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("key, wrong", [("d_model", 512), ("d_mlp", 2048), ("n_ctx", 4096), ("n_layers", 12)])
def test_stated_model_shapes_are_checked_when_the_model_loads(smollm2, key, wrong):
    """config/model/*.yaml states the widths and context the config checks use before any model is
    loaded; a wrong value is one ConfigError naming the key and the model's value."""
    import yaml

    from mechflow.config import DEFAULT_CONFIG_DIR
    from mechflow.errors import ConfigError
    from mechflow.models import load_model_from_cfg

    cfg = yaml.safe_load((DEFAULT_CONFIG_DIR / "model" / "smollm2_135m.yaml").read_text())
    assert load_model_from_cfg(cfg).model is smollm2.model  # the stated values are right
    with pytest.raises(ConfigError, match=rf"model\.{key} = {wrong}, but smollm2_135m has {key} = \d+: set"):
        load_model_from_cfg({**cfg, key: wrong})


@pytest.mark.slow
def test_linear_weight_layout_is_bit_identical(smollm2):
    """`linear_weight_layout` (the loaded models' weights re-strided so TL 3's per-forward
    ``W.T.contiguous()`` is free) changes no output bit: a copy with row-major weights agrees exactly."""
    import copy

    from mechflow.models.registry import LINEAR_WEIGHTS

    model = smollm2.model
    restrided = [n for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in LINEAR_WEIGHTS]
    assert len(restrided) == 3 * model.cfg.n_layers + 1
    assert all(p.T.is_contiguous() for n, p in model.named_parameters() if n in restrided)
    plain = copy.deepcopy(model)
    for n, p in plain.named_parameters():
        if n in restrided:
            p.data = p.data.contiguous()
    assert not plain.W_U.T.is_contiguous()
    ids = torch.cat([smollm2.to_tokens(PROMPTS[0])] * 2)
    with torch.no_grad():
        assert torch.equal(model(ids), plain(ids))
        _, cache = model.run_with_cache(ids[:1], names_filter=lambda n: n.endswith("mlp_out"))
        _, cache_plain = plain.run_with_cache(ids[:1], names_filter=lambda n: n.endswith("mlp_out"))
    assert all(torch.equal(cache[k], cache_plain[k]) for k in cache)
