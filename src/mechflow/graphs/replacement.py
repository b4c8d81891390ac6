"""The local replacement model of one prompt: transcoders in place of every MLP, error nodes, and the
frozen (linear) system whose direct effects are the edges of an attribution graph.

Definitions (Ameisen et al. 2025, "Circuit Tracing", §"Building a local replacement model";
circuit-tracer's `ReplacementModel.setup_attribution` and `_configure_gradient_flow`):

- Every MLP ``l`` is replaced by its transcoder: features ``a_l = JumpReLU(x_l W_enc + b_enc)``
  read the MLP's input ``x_l`` (the transcoder set's ``in_hook``, ``blocks.{l}.ln2.hook_normalized``
  for mechflow's transcoders) and write ``a_l W_dec + b_dec (+ x_l W_skipᵀ)`` to the MLP's output.
- One **error node** per (layer, position) holds ``mlp_out − transcoder(x)``, so the replacement
  model reproduces the real model's output on this prompt exactly.
- On this prompt, attention patterns and normalisation scales are **frozen** at their values, and
  features are constant (their activations are the prompt's). What is left is affine in the
  token embeddings, the features' decoder outputs and the error nodes: the direct effect of a
  source node on a target is a single contraction (`mechflow.graphs.attribution`).
- As circuit-tracer does (``zero_bos``), activations and errors at a leading BOS position are set
  to zero: the MLP output there becomes a constant of the frozen system, not a node (transcoders
  are trained without BOS rows: `data.exclude_bos`) — except a skip transcoder's linear term
  ``x W_skipᵀ``, which stays a linear path at BOS as at every position (circuit-tracer's
  `ReplacementModel._configure_skip_connection` adds it at every position; its cross-check in
  `tests/crosscheck/model_level.py` compares the edges).

`frozen_forward` runs that frozen system forward, optionally with a node's output added once more
(the circuit-tracer check that each adjacency column is the exact effect of doubling its node);
the tests use it as the exact reference for the backward-pass edges.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from mechflow.errors import ConfigError, DataError

FROZEN_SUFFIXES = ("hook_pattern", "hook_scale")  # attention patterns and every norm's scale


@dataclass(frozen=True)
class LayerTranscoder:
    """The weights of one layer's JumpReLU transcoder, on raw activations (scales folded in).

    ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``threshold [d_sae]``, ``W_dec [d_sae, d_out]``,
    ``b_dec [d_out]``, ``W_skip [d_out, d_in]`` or None (SAELens' `jumprelu_transcoder` /
    `jumprelu_skip_transcoder` tensors)."""

    W_enc: Tensor
    b_enc: Tensor
    threshold: Tensor
    W_dec: Tensor
    b_dec: Tensor
    W_skip: Tensor | None = None

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def to(self, dtype: torch.dtype) -> LayerTranscoder:
        return LayerTranscoder(*(None if t is None else t.detach().to(dtype) for t in
                                 (self.W_enc, self.b_enc, self.threshold, self.W_dec, self.b_dec, self.W_skip)))

    def pre_acts(self, x: Tensor) -> Tensor:
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """JumpReLU: the pre-activation where it exceeds the threshold, else 0 (SAELens' forward)."""
        pre = self.pre_acts(x)
        return pre * (pre > self.threshold)

    def skip(self, x: Tensor) -> Tensor | None:
        return None if self.W_skip is None else x @ self.W_skip.T

    def decode(self, acts: Tensor, x: Tensor) -> Tensor:
        out = acts @ self.W_dec + self.b_dec
        skip = self.skip(x)
        return out if skip is None else out + skip


@dataclass(frozen=True)
class TranscoderSet:
    """One transcoder per MLP of a model, with the hooks they read and write (``{layer}`` in the
    hook names is the layer index)."""

    transcoders: Mapping[int, LayerTranscoder]
    in_hook: str = "blocks.{layer}.ln2.hook_normalized"
    out_hook: str = "blocks.{layer}.hook_mlp_out"

    @classmethod
    def from_folders(cls, folders: Sequence[str | Path]) -> TranscoderSet:
        """Per-layer (or skip) transcoders written by `train_transcoder`: one folder per layer (the
        transcoder set) or folders holding several layers; every layer must use the same hooks."""
        from mechflow.dictionaries.transcoder import load_transcoder, read_transcoder_index

        layers: dict[int, LayerTranscoder] = {}
        templates: set[tuple[str, str]] = set()
        for path in folders:
            index = read_transcoder_index(path)
            if index["kind"] == "clt":
                raise ConfigError(f"{path}: cross-layer transcoders are not supported by the graph stage yet "
                                  "(transcoder kind clt); train the per-layer transcoder set (transcoder_set)")
            stack = load_transcoder(path)
            for i, layer in enumerate(index["layers"]):
                if layer in layers:
                    raise ConfigError(f"layer {layer} has two transcoders ({path} and an earlier folder): "
                                      "give one folder per layer")
                templates.add((_template(index["in_hooks"][i], layer), _template(index["out_hooks"][i], layer)))
                layers[layer] = LayerTranscoder(
                    stack.W_enc[i].detach(), stack.b_enc[i].detach(), stack.threshold[i].detach(),
                    stack.W_dec_stack[i].detach(), stack.b_dec[i].detach(),
                    None if stack.W_skip is None else stack.W_skip[i].detach())
        if len(templates) != 1:
            raise ConfigError(f"transcoder folders {[str(p) for p in folders]} read/write different hooks "
                              f"{sorted(templates)}: train the whole set with one transcoder_set config")
        in_hook, out_hook = templates.pop()
        return cls(layers, in_hook, out_hook)

    def hook_in(self, layer: int) -> str:
        return self.in_hook.format(layer=layer)

    def hook_out(self, layer: int) -> str:
        return self.out_hook.format(layer=layer)

    def check(self, model) -> None:
        """One clear error for a set that does not fit ``model`` (missing layers, widths, hooks)."""
        n_layers = model.cfg.n_layers
        missing = sorted(set(range(n_layers)) - set(self.transcoders))
        if missing:
            raise ConfigError(
                f"no transcoder for layer(s) {missing} of {model.cfg.model_name} ({n_layers} layers): an "
                "attribution graph needs one per MLP (graph.transcoders must list every layer; train "
                "them with transcoder=all_layers)")
        extra = sorted(set(self.transcoders) - set(range(n_layers)))
        if extra:
            raise ConfigError(f"transcoders for layer(s) {extra} that {model.cfg.model_name} does not have "
                              f"({n_layers} layers): they belong to another model")
        for layer in range(n_layers):
            for hook in (self.hook_in(layer), self.hook_out(layer)):
                if hook not in model.hook_dict:
                    raise ConfigError(f"transcoder hook {hook!r} is not a hook point of {model.cfg.model_name} "
                                      "(transcoder.in_hook / out_hook)")
            tc = self.transcoders[layer]
            if tc.d_in != model.cfg.d_model or tc.d_out != model.cfg.d_model:
                raise ConfigError(
                    f"the layer-{layer} transcoder maps d_in {tc.d_in} -> d_out {tc.d_out}, but "
                    f"{model.cfg.model_name} has d_model {model.cfg.d_model}: it was trained on another model")

    def to(self, dtype: torch.dtype) -> TranscoderSet:
        return TranscoderSet({k: v.to(dtype) for k, v in self.transcoders.items()}, self.in_hook, self.out_hook)


@dataclass
class PromptState:
    """What the replacement model of one prompt needs, from one forward pass of the real model."""

    tokens: Tensor                     # [P] token ids
    logits: Tensor                     # [P, d_vocab] of the real model
    inputs: Tensor                     # [L, P, d_in] transcoder inputs x_l
    activations: Tensor                # [L, P, d_sae] feature activations (0 at a zeroed BOS)
    errors: Tensor                     # [L, P, d_out] mlp_out - transcoder(x) (0 at a zeroed BOS)
    mlp_out: Tensor                    # [L, P, d_out] the real MLP outputs
    token_vectors: Tensor              # [P, d_model] embeddings (hook_embed)
    frozen: dict[str, Tensor] = field(default_factory=dict)  # attention patterns and norm scales
    bos_zeroed: bool = False

    @property
    def n_layers(self) -> int:
        return self.inputs.shape[0]

    @property
    def n_pos(self) -> int:
        return self.tokens.shape[0]

    def active_features(self) -> tuple[Tensor, Tensor]:
        """``([n, 3] (layer, position, feature), [n] activation)`` of the active features, sorted by
        layer, then position, then feature (circuit-tracer's coalesced sparse order)."""
        index = self.activations.nonzero()
        return index, self.activations[index[:, 0], index[:, 1], index[:, 2]]


def _template(hook: str, layer: int) -> str:
    """``blocks.7.hook_mlp_out`` of layer 7 -> ``blocks.{layer}.hook_mlp_out``."""
    return re.sub(rf"^blocks\.{layer}\.", "blocks.{layer}.", hook)


def is_frozen(name: str) -> bool:
    return name.endswith(FROZEN_SUFFIXES)


@torch.no_grad()
def setup_prompt(model, transcoders: TranscoderSet, tokens: Tensor, *, zero_bos: bool = True,
                 bos_token_id: int | None = None, max_tokens: int | None = None) -> PromptState:
    """Run the real model on ``tokens`` ([P] ids) and record the replacement model's pieces.

    ``zero_bos``: when the first token is ``bos_token_id`` (default: the tokenizer's), its
    activations and errors are zeroed (circuit-tracer's default; see the module docstring)."""
    tokens = check_tokens(tokens, model)
    if max_tokens is not None and tokens.numel() > max_tokens:
        raise ConfigError(f"the prompt has {tokens.numel()} tokens, more than graph.max_tokens = {max_tokens}: "
                          "shorten the prompt or raise graph.max_tokens (cost grows with the square of length)")
    transcoders.check(model)
    L = model.cfg.n_layers
    wanted = {transcoders.hook_in(layer) for layer in range(L)} | {transcoders.hook_out(layer) for layer in range(L)}
    logits, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n in wanted or n == "hook_embed"
                                         or is_frozen(n))
    logits = logits[0]
    inputs = torch.stack([cache[transcoders.hook_in(layer)][0] for layer in range(L)])
    mlp_out = torch.stack([cache[transcoders.hook_out(layer)][0] for layer in range(L)])
    dtype = inputs.dtype
    acts, errors = [], []
    for layer in range(L):
        tc = transcoders.transcoders[layer].to(dtype)
        a = tc.encode(inputs[layer])
        acts.append(a)
        errors.append(mlp_out[layer] - tc.decode(a, inputs[layer]))
    activations, errors_t = torch.stack(acts), torch.stack(errors)
    if bos_token_id is None and getattr(model, "tokenizer", None) is not None:
        bos_token_id = model.tokenizer.bos_token_id
    bos_zeroed = bool(zero_bos and bos_token_id is not None and int(tokens[0]) == int(bos_token_id))
    if bos_zeroed:
        activations[:, 0] = 0
        errors_t[:, 0] = 0
    frozen = {name: cache[name] for name in cache.keys() if is_frozen(name)}
    return PromptState(tokens=tokens, logits=logits, inputs=inputs, activations=activations, errors=errors_t,
                       mlp_out=mlp_out, token_vectors=cache["hook_embed"][0], frozen=frozen, bos_zeroed=bos_zeroed)


@dataclass
class Perturbation:
    """Extra output added to the frozen system: ``mlp[l]`` to MLP l's output ``[P, d]``,
    ``embed`` to the token embeddings ``[P, d]``."""

    mlp: dict[int, Tensor] = field(default_factory=dict)
    embed: Tensor | None = None


@dataclass
class FrozenOutput:
    inputs: Tensor        # [L, P, d_in] transcoder inputs in the frozen system
    final: Tensor         # [P, d_model] the unembedding's input (ln_final output)
    logits: Tensor        # [P, d_vocab] final @ W_U + b_U (no soft-cap: it is not linear)

    def pre_acts(self, transcoders: TranscoderSet) -> Tensor:
        """[L, P, d_sae] every feature's pre-activation in the frozen system."""
        return torch.stack([transcoders.transcoders[layer].to(self.inputs.dtype).pre_acts(self.inputs[layer])
                            for layer in range(self.inputs.shape[0])])


@torch.no_grad()
def frozen_forward(model, transcoders: TranscoderSet, state: PromptState,
                   perturbation: Perturbation | None = None) -> FrozenOutput:
    """The local replacement model's forward pass on the prompt: attention patterns and norm scales
    are the recorded ones, every MLP outputs its features' fixed decoder output + b_dec + skip(x)
    + its error node (at a zeroed BOS: the real MLP output, plus the change of its skip term), plus
    ``perturbation``.

    Without a perturbation this reproduces the real model's logits (up to float rounding)."""
    perturbation = perturbation or Perturbation()
    L = state.n_layers
    seen: dict[int, Tensor] = {}

    def frozen_value(value, hook):
        return state.frozen[hook.name].to(value.dtype)

    def embed(value, hook):
        return value if perturbation.embed is None else value + perturbation.embed.to(value.dtype)

    def capture(value, hook, layer):
        seen[layer] = value[0]
        return value

    def replace_mlp(value, hook, layer):
        tc = transcoders.transcoders[layer].to(value.dtype)
        out = tc.decode(state.activations[layer], seen[layer]) + state.errors[layer]
        if state.bos_zeroed:  # a constant, plus the skip term's change: linear at every position, as
            out[0] = state.mlp_out[layer, 0]  # circuit-tracer's `_configure_skip_connection` makes it
            skip = tc.skip(seen[layer][:1])
            if skip is not None:
                out[0] = out[0] + skip[0] - tc.skip(state.inputs[layer, :1])[0]
        if layer in perturbation.mlp:
            out = out + perturbation.mlp[layer].to(value.dtype)
        return out[None]

    hooks = [(name, frozen_value) for name in state.frozen]
    hooks.append(("hook_embed", embed))
    for layer in range(L):
        hooks.append((transcoders.hook_in(layer), partial(capture, layer=layer)))
        hooks.append((transcoders.hook_out(layer), partial(replace_mlp, layer=layer)))
    with model.hooks(fwd_hooks=hooks):
        resid = model(state.tokens[None], stop_at_layer=L)
        final = model.ln_final(resid)[0]
    logits = final @ model.W_U + model.b_U
    return FrozenOutput(torch.stack([seen[layer] for layer in range(L)]), final, logits)


def check_tokens(tokens: Tensor, model) -> Tensor:
    tokens = torch.as_tensor(tokens).reshape(-1)
    if tokens.numel() == 0:
        raise DataError("empty prompt: an attribution graph needs at least one token")
    if int(tokens.max()) >= model.cfg.d_vocab or int(tokens.min()) < 0:
        raise DataError(f"token ids outside the vocabulary of {model.cfg.model_name} (d_vocab {model.cfg.d_vocab})")
    return tokens
