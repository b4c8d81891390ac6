"""The HF-hooks backend: any Hugging Face causal LM behind the small part of HookedTransformer that
mechflow's node-level stages use (harvest, dictionary training, dictionary metrics).

Used when TransformerLens does not support an architecture, or when ``model.backend: hf`` asks for
it. Everything goes through plain PyTorch ``register_forward_hook`` / ``register_forward_pre_hook``
on the HF modules; every hook is removed when the call returns (``try/finally``), so the wrapped
model is left as it was found.

1. Find the modules (``find_modules``): the decoder-layer ``ModuleList`` (the one whose length is
   the config's ``num_hidden_layers``), each layer's MLP (child ``mlp``, ``feed_forward``, ``ffn``
   ...), the input embedding (``get_input_embeddings()``) and the final norm (a ``*norm*`` /
   ``ln_f`` sibling of the layers). ``model.hf_modules`` overrides any of them.
2. Map TransformerLens hook names onto those modules (``HookedHF.hook_dict``):

   ==============================  =========================================================
   TL hook name                    HF point
   ==============================  =========================================================
   ``hook_embed``                  output of ``get_input_embeddings()``
   ``blocks.{l}.hook_resid_pre``   input (hidden states) of decoder layer ``l``
   ``blocks.{l}.hook_resid_post``  output (``[0]`` of a tuple) of decoder layer ``l``
   ``blocks.{l}.ln2.hook_normalized``  input of layer ``l``'s MLP (``mlp_in``)
   ``blocks.{l}.hook_mlp_out``     output of layer ``l``'s MLP
   ``ln_final.hook_normalized``    output of the final norm
   ==============================  =========================================================

   ``mlp_in`` decision: it is the MLP's real input, i.e. the output of the pre-MLP norm WITH its
   weight (and bias). mechflow's TransformerLens models are loaded with ``fold_ln=True``, so there
   ``ln2.hook_normalized`` is ``x / rms(x)`` with the norm weight folded into the MLP's weights; for
   RMSNorm models the HF value is the TL value times the norm weight (tested on SmolLM2). Both
   are "what the MLP reads" in their own backend, which is what a transcoder needs; they are not
   interchangeable across backends (the manifest records the backend). ``ln_final.hook_normalized``
   likewise includes the final norm's weight. ``resid_pre`` / ``resid_post`` / ``mlp_out`` /
   ``hook_embed`` are the same tensors as TransformerLens's (float tolerance, tested on SmolLM2).
3. ``run_with_cache`` records the requested points and, for ``stop_at_layer=k``, stops the forward
   pass by raising a private exception from a hook on layer ``k - 1`` (on the embedding for 0), as
   TL's ``stop_at_layer`` (blocks ``0..k-1`` run, nothing after).
4. ``run_with_hooks`` runs TL-style ``fwd_hooks=[(name, fn)]`` where ``fn(act, hook)`` may return a
   replacement tensor (``None``: unchanged), ``hook.name`` being the TL name.

Head-level points (``hook_z``, ``hook_pattern``, ``attn.hook_*``) and MLP hidden activations
(``mlp.hook_post``) are not offered: the HF attention and MLP internals differ per architecture.
Stages that need them (edge patching, head attribution, ...) refuse an HF model with one error
(``mechflow.models.registry.require_backend``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mechflow.errors import ModelLoadError

log = logging.getLogger(__name__)

__all__ = ["HFConfig", "HookedHF", "find_modules", "MODULE_KEYS"]

MODULE_KEYS = ("layers", "mlp", "embed", "final_norm")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block", "block_sparse_moe", "ff")
_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm", "norm_f")


class _Stop(Exception):
    """Raised from a hook to end a forward pass after the deepest layer `run_with_cache` needs."""


@dataclass(frozen=True)
class HFConfig:
    """The fields of ``HookedTransformerConfig`` the node-level stages read (from the HF config)."""

    model_name: str
    original_architecture: str
    n_layers: int
    d_model: int
    d_mlp: int | None
    d_vocab: int
    n_ctx: int
    n_heads: int
    n_key_value_heads: int | None
    d_head: int | None
    dtype: torch.dtype
    device: str = "cpu"


@dataclass(frozen=True)
class HookPoint:
    """One TL-named point: the HF module and whether its input or output is the activation."""

    name: str
    module: str
    where: str  # "input" (first positional argument or hidden_states) | "output" (first element)

    def describe(self) -> str:
        return f"{self.module} ({self.where})"


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _first(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _override_error(key: str, what: str) -> ModelLoadError:
    return ModelLoadError(f"could not find {what} of the Hugging Face model; set model.hf_modules.{key} to its "
                          f"module path (see `print(model)`), e.g. model.hf_modules={{{key}: ...}}")


def find_modules(hf_model: nn.Module, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Module paths of the decoder layers, MLP (relative to a layer), embedding and final norm.

    Args:
        hf_model: a transformers causal LM.
        overrides: ``model.hf_modules``: any of ``layers`` (path of the layers' ModuleList), ``mlp``
            (a layer's MLP child name), ``embed``, ``final_norm`` (module paths).

    Raises:
        ModelLoadError: a module was not found (or an override names no module); names the key.
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(MODULE_KEYS))
    if unknown:
        raise ModelLoadError(f"model.hf_modules: unknown key(s) {unknown}; valid keys: {list(MODULE_KEYS)}")
    named = dict(hf_model.named_modules())
    for key, path in overrides.items():
        if key != "mlp" and path not in named:
            raise ModelLoadError(f"model.hf_modules.{key}={path!r} is not a module of the model; "
                                 "see `print(model)` for the module paths")
    n_layers = _first(_text_config(hf_model.config), "num_hidden_layers", "n_layer", "num_layers")
    found: dict[str, str] = {}
    layers = overrides.get("layers")
    if layers is None:
        candidates = [p for p, m in named.items() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
        if not candidates:
            raise _override_error("layers", f"the decoder layers (a ModuleList of {n_layers} modules)")
        layers = min(candidates, key=lambda p: (p.count("."), p))
    found["layers"] = layers
    first_layer = named[layers][0]
    mlp = overrides.get("mlp") or next((n for n in _MLP_NAMES if isinstance(getattr(first_layer, n, None),
                                                                          nn.Module)), None)
    if mlp is None or not isinstance(dict(first_layer.named_modules()).get(mlp), nn.Module):
        if "mlp" in overrides:
            raise ModelLoadError(f"model.hf_modules.mlp={mlp!r} is not a module of {layers}.0")
        raise _override_error("mlp", f"the MLP of each decoder layer (a child named one of {list(_MLP_NAMES)})")
    found["mlp"] = mlp
    embed = overrides.get("embed")
    if embed is None:
        emb = hf_model.get_input_embeddings()
        embed = next((p for p, m in named.items() if m is emb), None)
        if embed is None:
            raise _override_error("embed", "the input embedding")
    found["embed"] = embed
    norm = overrides.get("final_norm")
    if norm is None:
        parent = layers.rpartition(".")[0]
        norm = next((f"{parent}.{n}" if parent else n for n in _NORM_NAMES
                     if (f"{parent}.{n}" if parent else n) in named), None)
    if norm is not None:  # optional: without it, ln_final.hook_normalized is simply not offered
        found["final_norm"] = norm
    return found


class HookedHF(nn.Module):
    """A Hugging Face causal LM with TransformerLens-named hook points (module docstring).

    Exposes ``cfg``, ``hook_dict``, ``tokenizer``, ``__call__(tokens, return_type="logits")``,
    ``run_with_cache`` and ``run_with_hooks`` with TransformerLens' signatures, enough for harvest and
    the dictionary metrics. ``hook_modules`` maps each TL name to the HF module it reads.
    """

    def __init__(self, hf_model: nn.Module, tokenizer: Any = None, *, model_name: str | None = None,
                 modules: Mapping[str, str] | None = None):
        super().__init__()
        self.hf = hf_model
        self.tokenizer = tokenizer
        self.modules_found = find_modules(hf_model, modules)
        self._named = dict(hf_model.named_modules())
        self.cfg = self._make_cfg(model_name)
        self.hook_dict: dict[str, HookPoint] = self._make_points()

    def _make_cfg(self, model_name: str | None) -> HFConfig:
        c = _text_config(self.hf.config)
        arch = (getattr(self.hf.config, "architectures", None) or [type(self.hf).__name__])[0]
        n_heads = _first(c, "num_attention_heads", "n_head", "num_heads")
        d_model = _first(c, "hidden_size", "n_embd", "d_model")
        return HFConfig(
            model_name=model_name or getattr(c, "_name_or_path", None) or arch,
            original_architecture=arch,
            n_layers=len(self._named[self.modules_found["layers"]]),
            d_model=d_model,
            d_mlp=_first(c, "intermediate_size", "n_inner", "ffn_dim"),
            d_vocab=_first(c, "vocab_size"),
            # No length limit stated (rare): unbounded, the model itself then decides.
            n_ctx=_first(c, "max_position_embeddings", "n_positions", "max_sequence_length") or 2**31 - 1,
            n_heads=n_heads,
            n_key_value_heads=_first(c, "num_key_value_heads"),
            d_head=_first(c, "head_dim") or (d_model // n_heads if d_model and n_heads else None),
            dtype=next(self.hf.parameters()).dtype,
        )

    def _make_points(self) -> dict[str, HookPoint]:
        m = self.modules_found
        points = [HookPoint("hook_embed", m["embed"], "output")]
        for layer in range(self.cfg.n_layers):
            path = f"{m['layers']}.{layer}"
            points += [HookPoint(f"blocks.{layer}.hook_resid_pre", path, "input"),
                       HookPoint(f"blocks.{layer}.ln2.hook_normalized", f"{path}.{m['mlp']}", "input"),
                       HookPoint(f"blocks.{layer}.hook_mlp_out", f"{path}.{m['mlp']}", "output"),
                       HookPoint(f"blocks.{layer}.hook_resid_post", path, "output")]
        if "final_norm" in m:
            points.append(HookPoint("ln_final.hook_normalized", m["final_norm"], "output"))
        return {p.name: p for p in points}

    @property
    def hook_modules(self) -> dict[str, str]:
        """TL hook name → ``"<HF module path> (input|output)"``, as written in the harvest manifest."""
        return {name: p.describe() for name, p in self.hook_dict.items()}

    # -- hooks -------------------------------------------------------------------------------------

    def _install(self, point: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor | None]):
        module = self._named[point.module]
        if point.where == "input":
            def pre(_mod, args, kwargs):
                positional = bool(args)
                act = args[0] if positional else kwargs["hidden_states"]
                new = fn(act)
                if new is None or new is act:
                    return None
                return ((new, *args[1:]), kwargs) if positional else (args, {**kwargs, "hidden_states": new})

            return module.register_forward_pre_hook(pre, with_kwargs=True)

        def post(_mod, _args, output):
            is_tuple = isinstance(output, tuple)
            act = output[0] if is_tuple else output
            new = fn(act)
            if new is None or new is act:
                return None
            return (new, *output[1:]) if is_tuple else new

        return module.register_forward_hook(post)

    def _point(self, name: str) -> HookPoint:
        if name not in self.hook_dict:
            raise KeyError(f"{name!r} is not a hook point of the HF backend; it offers {self.point_kinds()}")
        return self.hook_dict[name]

    @staticmethod
    def point_kinds() -> list[str]:
        """The hook-name patterns this backend offers."""
        return ["hook_embed", "blocks.{l}.hook_resid_pre", "blocks.{l}.ln2.hook_normalized",
                "blocks.{l}.hook_mlp_out", "blocks.{l}.hook_resid_post", "ln_final.hook_normalized"]

    def _stop_hook(self, stop_at_layer: int):
        def stop(*_):
            raise _Stop

        n = self.cfg.n_layers
        k = stop_at_layer + n if stop_at_layer < 0 else stop_at_layer
        module = self._named[self.modules_found["embed"]] if k <= 0 else \
            self._named[f"{self.modules_found['layers']}.{min(k, n) - 1}"]
        return module.register_forward_hook(stop)

    def _names(self, names_filter: str | Iterable[str] | Callable[[str], bool] | None) -> list[str]:
        if names_filter is None:
            return list(self.hook_dict)
        if isinstance(names_filter, str):
            return [names_filter]
        if callable(names_filter):
            return [n for n in self.hook_dict if names_filter(n)]
        return list(names_filter)

    # -- TransformerLens-like API -----------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, return_type: str | None = "logits") -> torch.Tensor | None:
        """Logits ``[batch, pos, d_vocab]`` of `tokens` (``return_type=None``: run, return nothing)."""
        if return_type not in ("logits", None):
            raise ValueError(f"HookedHF supports return_type 'logits' or None, not {return_type!r}")
        logits = self.hf(input_ids=tokens.to(self.hf.device), use_cache=False).logits
        return logits if return_type == "logits" else None

    def run_with_hooks(self, tokens: torch.Tensor, *, return_type: str | None = "logits",
                       fwd_hooks: Iterable[tuple[str, Callable]] = ()) -> torch.Tensor | None:
        """Forward with TL-style ``fwd_hooks=[(name, fn)]``; ``fn(act, hook)`` may return a replacement."""
        handles = []
        try:
            for name, fn in fwd_hooks:
                point = self._point(name)
                handles.append(self._install(point, lambda act, fn=fn, point=point: fn(act, point)))
            return self(tokens, return_type=return_type)
        finally:
            for h in handles:
                h.remove()

    def run_with_cache(self, tokens: torch.Tensor, *, names_filter=None, stop_at_layer: int | None = None,
                       return_type: str | None = "logits") -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """``(logits, cache)`` with the activations of the points `names_filter` selects.

        With `stop_at_layer` the pass ends after block ``stop_at_layer - 1`` and logits are None.
        """
        cache: dict[str, torch.Tensor] = {}
        handles = []

        def record(name: str):
            def fn(act):
                cache[name] = act.detach().clone()  # clone: a later in-place op must not change it

            return fn

        try:
            for name in self._names(names_filter):
                handles.append(self._install(self._point(name), record(name)))
            if stop_at_layer is not None:
                handles.append(self._stop_hook(stop_at_layer))  # last: fires after the layer's own records
            try:
                logits = self(tokens, return_type=return_type)
            except _Stop:
                logits = None
        finally:
            for h in handles:
                h.remove()
        return logits, cache
