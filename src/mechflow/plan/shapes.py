"""The arithmetic of a decoder-only transformer's shapes: parameters, forward FLOPs per token, bytes.

`ModelShape` holds what the costs depend on (layers, widths, heads, vocabulary, gated MLP, tied
embeddings). `PRESETS` are public configurations from 135M to 70B parameters (the values of each
model's Hugging Face ``config.json``), so `mechflow plan` can size a run for a model this machine
cannot load. `shape_of_model` reads the shape of a loaded model (TransformerLens config), and
`tests/unit/plan` checks `ModelShape.params` against the real SmolLM2's parameter count.

FLOPs count multiply-adds as 2 (the usual convention: a ``[n, a] @ [a, b]`` matmul is ``2nab``).
Norms, activation functions, rotary embeddings and softmax are left out: < 1% of a forward at these
widths. Attention scores and the weighted sum cost ``4 · n_heads · d_head · ctx`` per token and layer
for a context of ``ctx`` tokens (on average half the context is attended to under a causal mask).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mechflow.errors import ConfigError

BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The shapes a run's costs depend on."""

    name: str
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_vocab: int
    gated_mlp: bool = True
    tied_embeddings: bool = False

    @property
    def attn_params(self) -> int:
        """Q, K, V, O weights of one layer (biases ignored)."""
        q_o = 2 * self.d_model * self.n_heads * self.d_head
        k_v = 2 * self.d_model * self.n_kv_heads * self.d_head
        return q_o + k_v

    @property
    def mlp_params(self) -> int:
        """MLP weights of one layer: gate, up, down (gated) or in, out."""
        return (3 if self.gated_mlp else 2) * self.d_model * self.d_mlp

    @property
    def params(self) -> int:
        """Parameters as the Hugging Face model counts them (norm weights included, biases not)."""
        embed = self.d_vocab * self.d_model * (1 if self.tied_embeddings else 2)
        norms = (2 * self.n_layers + 1) * self.d_model
        return embed + self.n_layers * (self.attn_params + self.mlp_params) + norms

    def layer_flops(self, ctx: int) -> float:
        """Forward FLOPs per token of one block, for contexts of `ctx` tokens."""
        attention = 4 * self.n_heads * self.d_head * ctx / 2  # causal: half the context on average
        return 2 * (self.attn_params + self.mlp_params) + attention

    def forward_flops(self, ctx: int, layers: int | None = None, unembed: bool = True) -> float:
        """Forward FLOPs per token through the first `layers` blocks (all by default), plus the
        unembedding when `unembed`."""
        n = self.n_layers if layers is None else layers
        return n * self.layer_flops(ctx) + (2 * self.d_model * self.d_vocab if unembed else 0)

    def width_of(self, hook: str) -> int:
        """Width of a TransformerLens hook's activation (``d_mlp`` for MLP hidden hooks, else d_model)."""
        return self.d_mlp if hook.endswith(("mlp.hook_pre", "mlp.hook_post", "mlp.hook_pre_linear")) else self.d_model

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "params": self.params}


# Public configs (each model's config.json on the Hugging Face hub). Keys are what `mechflow plan
# --model` accepts besides the embedded models' names.
PRESETS: dict[str, ModelShape] = {s.name: s for s in (
    ModelShape("SmolLM2-135M", 30, 576, 1536, 9, 3, 64, 49152, tied_embeddings=True),
    ModelShape("Gemma-3-270M", 18, 640, 2048, 4, 1, 256, 262144, tied_embeddings=True),
    ModelShape("Llama-3.2-1B", 16, 2048, 8192, 32, 8, 64, 128256, tied_embeddings=True),
    ModelShape("Gemma-2-2B", 26, 2304, 9216, 8, 4, 256, 256000, tied_embeddings=True),
    ModelShape("Llama-3.1-8B", 32, 4096, 14336, 32, 8, 128, 128256),
    ModelShape("Gemma-2-9B", 42, 3584, 14336, 16, 8, 256, 256000, tied_embeddings=True),
    ModelShape("Gemma-2-27B", 46, 4608, 36864, 32, 16, 128, 256000, tied_embeddings=True),
    ModelShape("Llama-3.1-70B", 80, 8192, 28672, 64, 8, 128, 128256),
)}
# mechflow's model names of the embedded models → their preset
EMBEDDED = {"smollm2_135m": "SmolLM2-135M", "gemma3_270m": "Gemma-3-270M"}


def preset(name: str) -> ModelShape:
    """The preset named `name` (a key of `PRESETS`, case-insensitive, or an embedded model's name)."""
    key = EMBEDDED.get(name, name)
    for k, shape in PRESETS.items():
        if k.lower() == key.lower():
            return shape
    raise ConfigError(f"plan: unknown model {name!r}; use one of {sorted(PRESETS)} or {sorted(EMBEDDED)}, "
                      "or give the shape with --layers/--d-model/--d-mlp/--heads/--kv-heads/--d-head/--vocab")


def shape_of_model(model: Any, name: str | None = None) -> ModelShape:
    """The shape of a loaded TransformerLens model (``model.cfg``)."""
    cfg = model.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    return ModelShape(name or str(cfg.model_name), cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.n_heads, n_kv,
                      cfg.d_head, cfg.d_vocab, gated_mlp=bool(cfg.gated_mlp), tied_embeddings=tied)


# model_type values of Hugging Face configs whose MLP is not gated (two matrices, not three)
UNGATED = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "starcoder2", "gpt_bigcode", "mpt", "bert"}


def shape_from_hf_config(config: dict[str, Any], name: str = "model") -> ModelShape:
    """The shape in a Hugging Face ``config.json`` (Llama-, Gemma-, Qwen-, GPT-2-style key names)."""

    def get(*keys: str, default: Any = None) -> Any:
        for key in keys:
            if config.get(key) is not None:
                return config[key]
        if default is None:
            raise ConfigError(f"{name}: config.json has none of {list(keys)}; give the shape to `mechflow plan` "
                              "with --layers/--d-model/--d-mlp/--heads/--kv-heads/--d-head/--vocab")
        return default

    d_model = int(get("hidden_size", "n_embd", "d_model"))
    n_heads = int(get("num_attention_heads", "n_head"))
    return ModelShape(
        name=name, n_layers=int(get("num_hidden_layers", "n_layer")), d_model=d_model,
        d_mlp=int(get("intermediate_size", "n_inner", "ffn_dim", default=4 * d_model)), n_heads=n_heads,
        n_kv_heads=int(get("num_key_value_heads", default=n_heads)),
        d_head=int(get("head_dim", default=d_model // n_heads)), d_vocab=int(get("vocab_size")),
        gated_mlp=config.get("model_type") not in UNGATED,
        tied_embeddings=bool(config.get("tie_word_embeddings", True)))


def shape_for_model_cfg(model_cfg: Any) -> ModelShape | None:
    """The shape of a run's `model` group without loading it: an embedded model's or a preset's (by
    name, or the last part of a hub id such as ``meta-llama/Llama-3.1-8B``), else the ``config.json``
    of a local model folder; None when mechflow cannot know it before loading."""
    import json
    from pathlib import Path

    name = str(model_cfg["name"])
    if name in EMBEDDED:
        return PRESETS[EMBEDDED[name]]
    tail = name.rstrip("/").rsplit("/", 1)[-1].lower()
    for key, shape in PRESETS.items():
        if key.lower() == tail:
            return shape
    config = Path(name) / "config.json"
    if config.is_file():
        return shape_from_hf_config(json.loads(config.read_text()), name=config.parent.name)
    return None
