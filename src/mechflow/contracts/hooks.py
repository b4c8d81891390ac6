"""The TransformerLens hook vocabulary mechflow uses: one shorthand map, one expansion.

Hook names are TransformerLens' (``blocks.{layer}.hook_resid_post``, ...). Two shorthand
vocabularies name per-layer hooks:

* ``HOOK_POINTS``: the harvest's ``hook_points`` (config ``harvest.hook_points``), expanded with
  ``harvest.layers`` by `expand_hook_points` (layer-major: every point of layer 0, then layer 1, ...).
* ``COMPONENT_HOOKS``: where a component's activation lives, by component kind (``head``: the
  per-head ``attn.hook_z``, ``mlp``: ``hook_mlp_out``, ``resid``: ``hook_resid_pre``, ``attn``:
  ``hook_attn_out``); the attribution methods, node circuits and causal tracing patch these.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

HOOK_POINTS: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    # What the MLP reads: the ln2-normalised residual. mechflow loads models with fold_ln, so the
    # norm weight lives in W_in/W_gate and this is exactly the MLP's input (transcoders read it).
    "mlp_in": "blocks.{layer}.ln2.hook_normalized",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "attn_out": "blocks.{layer}.hook_attn_out",
}

COMPONENT_HOOKS: dict[str, str] = {
    "head": "attn.hook_z",
    "mlp": "hook_mlp_out",
    "resid": "hook_resid_pre",
    "attn": "hook_attn_out",
}

INPUT_HOOK = "blocks.0.hook_resid_pre"  # the embeddings entering block 0 (MIB node ``input``)
NEURON_HOOK = "blocks.{layer}.mlp.hook_post"  # MLP neuron activations

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def block_hook(layer: int, point: str) -> str:
    """``blocks.{layer}.{point}``, e.g. ``block_hook(3, COMPONENT_HOOKS["mlp"])``."""
    return f"blocks.{layer}.{point}"


def expand_hook_points(layers: Iterable[int], hook_points: Iterable[str]) -> list[str]:
    """``layers`` x ``hook_points`` (shorthands of `HOOK_POINTS`) as hook names, layer-major.

    Raises:
        KeyError: a hook point that is not a key of `HOOK_POINTS`.
    """
    points = list(hook_points)
    return [HOOK_POINTS[p].format(layer=layer) for layer in layers for p in points]


def selected_hooks(layers: Iterable[int], hook_points: Iterable[str], hooks: Iterable[str] = ()) -> list[str]:
    """The hooks a harvest config selects: `expand_hook_points` then ``hooks``, without repeats."""
    return list(dict.fromkeys(expand_hook_points(layers, hook_points) + list(hooks)))


def hook_layer(hook: str) -> int | None:
    """The block index of a `blocks.{l}.…` hook, else None."""
    m = _BLOCK.match(hook)
    return int(m.group(1)) if m else None


# Hooks whose activations live in the residual-stream basis (what W_U reads; width d_model).
RESIDUAL_HOOK = re.compile(r"(^|\.)(hook_resid_(pre|mid|post)|hook_attn_out|hook_mlp_out|hook_embed)$")
# Further hooks of width d_model (not in the residual basis: normalized, or the position embedding),
# and hooks of the MLP hidden layer (width d_mlp); other hooks (attention z, q/k/v, patterns) have no
# width check.
_D_MODEL_HOOK = re.compile(r"(^hook_pos_embed$|\.hook_mlp_in$|\.ln\d?\.hook_normalized$|^ln_final\.hook_normalized$)")
_D_MLP_HOOK = re.compile(r"\.mlp\.hook_(pre|post|pre_linear)$")


def hook_width(hook: str, d_model: int | None, d_mlp: int | None) -> int | None:
    """The width of `hook`'s activation given the model's widths, or None when it is not known."""
    if RESIDUAL_HOOK.search(hook) or _D_MODEL_HOOK.search(hook):
        return d_model
    if _D_MLP_HOOK.search(hook):
        return d_mlp
    return None
