"""Hook selection: config → validated TransformerLens hook names, and one forward pass for all.

The hook vocabulary (`HOOK_POINTS`, the layers × hook_points expansion, `hook_layer`) is the
contract's: `mechflow.contracts.hooks`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mechflow.contracts.hooks import HOOK_POINTS, expand_hook_points, hook_layer, selected_hooks
from mechflow.errors import ConfigError
from mechflow.harvest.config import HarvestConfig

__all__ = ["capture", "expand_hooks", "harvested_hooks", "hook_layer", "stop_layer"]
# Hooks whose second axis is not the token position: they cannot be stored one row per token.
_NOT_PER_POSITION = ("hook_pattern", "hook_attn_scores")
# Hooks computed before the first block: stop_at_layer=0 already produces them.
_PRE_BLOCK = ("hook_embed", "hook_pos_embed", "hook_tokens")


def harvested_hooks(harvest_cfg: Mapping[str, Any]) -> set[str]:
    """TransformerLens hook names a composed `harvest` group selects (no model needed: for planning)."""
    return set(selected_hooks(harvest_cfg.get("layers", []), harvest_cfg.get("hook_points", []),
                              harvest_cfg.get("hooks", [])))


def expand_hooks(cfg: HarvestConfig, model: Any) -> list[str]:
    """`layers` × `hook_points` plus `hooks`, validated against `model.hook_dict` (order kept, no repeats).

    ``mlp_in`` is ``blocks.{l}.ln2.hook_normalized``: the normalised residual the MLP reads (with
    mechflow's fold_ln the norm weight is folded into the MLP weights, so it is exactly the MLP input).
    With ``model.backend=hf`` (`mechflow.models.hf.HookedHF`) it is the HF MLP module's input, which
    includes the norm weight: again exactly what the MLP reads, in that backend.

    Raises:
        ConfigError: a layer is out of range or a hook is not a per-position hook of `model`.
    """
    n_layers = model.cfg.n_layers
    bad_layers = [layer for layer in cfg.layers if not 0 <= layer < n_layers]
    if bad_layers:
        raise ConfigError(f"harvest.layers: {bad_layers[0]} is out of range for a {n_layers}-layer model; "
                          f"use 0..{n_layers - 1}")
    names = expand_hook_points(cfg.layers, cfg.hook_points) + list(cfg.hooks)
    valid = model.hook_dict
    for name in names:
        if name not in valid and hasattr(model, "hook_modules"):  # HookedHF: fewer points than TL
            raise ConfigError(f"harvest.hooks: {name!r} is not offered by model.backend=hf, which reads "
                              f"{model.point_kinds()} (hook_points resid_pre, resid_post, mlp_in, mlp_out); "
                              "use those, or a model TransformerLens supports (docs/models.md)")
        if name not in valid or name.endswith(_NOT_PER_POSITION):
            examples = expand_hook_points([0], HOOK_POINTS) + ["hook_embed", "ln_final.hook_normalized"]
            why = "is not per-position" if name in valid else "is not a hook of this model"
            raise ConfigError(f"harvest.hooks: {name!r} {why}; valid examples: {examples} "
                              f"(or hook_points {list(HOOK_POINTS)} with harvest.layers)")
    return list(dict.fromkeys(names))


def stop_layer(hooks: list[str], n_layers: int) -> int | None:
    """Smallest `stop_at_layer` that still computes every hook (None: the full model is needed)."""
    needed = []
    for hook in hooks:
        layer = hook_layer(hook)
        if layer is not None:
            needed.append(layer + 1)
        elif hook in _PRE_BLOCK:
            needed.append(0)
        else:  # ln_final / unembed hooks need every block and the head
            return None
    return max(needed)


@torch.inference_mode()
def capture(model: Any, tokens: torch.Tensor, hooks: list[str], stop_at_layer: int | None) -> dict[str, torch.Tensor]:
    """One forward pass over `tokens` [batch, pos]; each hook's activation as [batch, pos, d]."""
    _, cache = model.run_with_cache(tokens, names_filter=hooks, stop_at_layer=stop_at_layer)
    out = {}
    for hook in hooks:
        act = cache[hook]
        if act.shape[:2] != tokens.shape:
            raise ConfigError(f"harvest.hooks: {hook!r} has shape {tuple(act.shape)}, not [batch, pos, ...]; "
                              f"only per-position hooks can be harvested")
        out[hook] = act.reshape(*tokens.shape, -1)
    return out
