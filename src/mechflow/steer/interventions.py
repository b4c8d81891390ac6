"""What the `steer` stage does to the model: one `Intervention` = what, where, how strong, as
TransformerLens forward hooks on the real model (no copy, no re-implementation of its forward).

* ``add``: ``x -> x + alpha * v`` at the hook (a contrast, probe, random or shuffled direction ``v``).
* ``scale`` / ``set``: a dictionary feature ``i`` clamped through its dictionary, ``a_i -> k a_i`` or
  ``a_i -> value``. With the error term kept (default; Marks et al. 2024) the hook's output is
  ``x + (a_i' - a_i) * d_i``, ``d_i = decode(e_i) - decode(0)`` the feature's effective decoder
  direction, so an unchanged activation leaves the model exactly as it is. Without it the output is
  the dictionary's reconstruction from the edited latents (the model then also pays the
  reconstruction error). An SAE reads and writes one hook; a transcoder encodes from its MLP input
  hook and writes its MLP output hook.

Positions: ``last`` edits the final position of each forward pass; ``all`` every position at or
after ``start`` (BOS is never edited). In cached generation each new token is its own forward pass,
so ``last`` then steers the final prompt token and every generated token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechflow.errors import ConfigError

Hook = tuple[str, Callable]


@dataclass
class Dictionary:
    """A trained dictionary the stage clamps features through (SAE or single-layer transcoder)."""

    kind: str  # "sae" | "transcoder"
    path: str
    hook_in: str
    hook_out: str
    start: int  # first position it was trained on (1: BOS excluded)
    encode: Callable[[Tensor], Tensor]  # x [..., d_in] -> dense latents [..., d_sae]
    decode: Callable[[Tensor, Tensor], Tensor]  # (latents, x) -> reconstruction [..., d_out]
    decoder: Tensor  # [d_sae, d_out] effective decoder direction of each latent

    @property
    def d_sae(self) -> int:
        return self.decoder.shape[0]


def sae_dictionary(sae: Any, path: Path, model: Any, start: int) -> Dictionary:
    """A SAELens SAE (`mechflow.features.stage.load_dictionary` of the run's `train_sae` folder) as a
    `Dictionary`."""
    from mechflow.features.logits import effective_decoder

    hook = sae.cfg.metadata.hook_name
    if hook not in model.hook_dict:
        raise ConfigError(f"the SAE {path} reads {hook!r}, not a hook of {model.cfg.model_name}; train it on this "
                          "model's harvest")
    dtype = model.cfg.dtype

    def encode(x: Tensor) -> Tensor:
        a = sae.encode(x.to(sae.dtype))
        return (a.to_dense() if a.is_sparse else a).to(dtype)

    def decode(a: Tensor, x: Tensor) -> Tensor:
        return sae.decode(a.to(sae.dtype)).to(dtype)

    return Dictionary("sae", str(path), hook, hook, start, encode, decode, effective_decoder(sae).to(dtype))


def transcoder_dictionary(path: Path, model: Any, start: int) -> Dictionary:
    """The run's transcoder (folder written by `train_transcoder`) as a `Dictionary`; one layer only."""
    from mechflow.dictionaries.transcoder import load_transcoder, read_transcoder_index

    index = read_transcoder_index(path)
    if index["kind"] == "clt" or len(index["layers"]) != 1:
        raise ConfigError(f"steer.transcoder_features: {path} is a {index['kind']} transcoder over layers "
                          f"{index['layers']}; feature clamps support a single-layer transcoder (transcoder.layers "
                          "with one layer), or leave steer.transcoder_features empty")
    tc = load_transcoder(path).eval()
    dtype = model.cfg.dtype
    W_dec, b_dec = tc.W_dec_stack[0].detach().to(dtype), tc.b_dec[0].detach().to(dtype)
    skip = tc.W_skip[0].detach().to(dtype) if tc.W_skip is not None else None

    def encode(x: Tensor) -> Tensor:
        shape = x.shape
        with torch.no_grad():
            a = tc.encode_layer(0, x.reshape(-1, shape[-1]).to(tc.W_enc.dtype))
        return a.reshape(*shape[:-1], -1).to(dtype)

    def decode(a: Tensor, x: Tensor) -> Tensor:
        out = a @ W_dec + b_dec
        return out + x @ skip.T if skip is not None else out

    return Dictionary("transcoder", str(path), index["in_hooks"][0], index["out_hooks"][0], start, encode, decode,
                      W_dec)


@dataclass
class Intervention:
    """One edit of the forward pass.

    Attributes:
        kind: contrast | probe | random | shuffled | sae_feature | transcoder_feature.
        id: e.g. ``contrast:L12``, ``sae:1234``, ``random:L12:7``.
        hook: the hook whose output is edited.
        positions: last | all.
        operation: add | scale | set.
        alpha: add: multiplier of `vector`; scale: k; set: the value.
        layer: the residual layer (directions) or the dictionary's layer.
    """

    kind: str
    id: str
    hook: str
    positions: str
    operation: str
    alpha: float
    layer: int | None = None
    vector: Tensor | None = None
    dictionary: Dictionary | None = None
    feature: int | None = None
    error_term: bool = True
    start: int = 1

    @property
    def strength(self) -> float:
        """How far from doing nothing: |alpha| (add), |k - 1| (scale), |value| (set)."""
        if self.operation == "scale":
            return abs(self.alpha - 1.0)
        return abs(self.alpha)

    def with_alpha(self, alpha: float) -> Intervention:
        return replace(self, alpha=float(alpha))

    def mask(self, n_batch: int, n_pos: int, last: Tensor | None = None) -> Tensor:
        """``[n_batch, n_pos, 1]`` 1.0 where the edit applies: position ``last[i]`` of row i (default: the
        final position) for ``last``; every position from `start` on for ``all`` (all of a one-token pass)."""
        pos = torch.arange(n_pos)[None, :]
        if self.positions == "last":
            end = last[:, None] if last is not None else torch.full((n_batch, 1), n_pos - 1)
            m = pos == end
        else:
            m = (pos >= (self.start if n_pos > 1 else 0)).expand(n_batch, n_pos)
        return m[..., None]

    def hooks(self, last: Tensor | None = None) -> list[Hook]:
        """`fwd_hooks` for `model.run_with_hooks` / `model.hooks` that apply this intervention; `last`
        ``[batch]``: each row's final real position when the batch is right-padded."""
        if self.operation == "add":
            if self.vector is None:
                raise ValueError(f"intervention {self.id}: add needs a vector")

            def add(act: Tensor, hook: Any = None) -> Tensor:
                if self.alpha == 0:
                    return act  # bit-identical: nothing is added, not even +0.0
                m = self.mask(act.shape[0], act.shape[1], last).to(act.dtype)
                return act + m * (self.alpha * self.vector.to(act.dtype))

            return [(self.hook, add)]
        d = self.dictionary
        if d is None or self.feature is None:
            raise ValueError(f"intervention {self.id}: {self.operation} needs a dictionary feature")
        store: dict[str, Tensor] = {}

        def edit(act: Tensor, x: Tensor) -> Tensor:
            m = self.mask(act.shape[0], act.shape[1], last)
            lat = d.encode(x)
            a = lat[..., self.feature]
            new = a * self.alpha if self.operation == "scale" else torch.full_like(a, self.alpha)
            if self.error_term:
                return act + (m[..., 0] * (new - a))[..., None] * d.decoder[self.feature].to(act.dtype)
            lat = lat.clone()
            lat[..., self.feature] = new
            return torch.where(m, d.decode(lat, x).to(act.dtype), act)

        if d.hook_in == d.hook_out:
            return [(d.hook_out, lambda act, hook=None: edit(act, act))]

        def grab(act: Tensor, hook: Any = None) -> Tensor:
            store["x"] = act
            return act

        return [(d.hook_in, grab), (d.hook_out, lambda act, hook=None: edit(act, store["x"]))]

    def spec(self) -> dict:
        """The record's description of this intervention (`mechflow.contracts.steer.InterventionSpec`)."""
        return {"kind": self.kind, "id": self.id, "hook": self.hook, "positions": self.positions,
                "operation": self.operation, "alpha": self.alpha, "strength": self.strength, "layer": self.layer,
                "norm": float(self.vector.norm()) if self.vector is not None else None,
                "dictionary": self.dictionary.path if self.dictionary is not None else None,
                "dictionary_kind": self.dictionary.kind if self.dictionary is not None else None,
                "feature": self.feature, "error_term": self.error_term if self.dictionary is not None else None}


def dictionary_attribution(model: Any, d: Dictionary, batches: Any) -> Tensor:
    """``[d_sae]`` mean over prompts of each latent's zero-ablation attribution with the error term kept:
    ``sum_pos a_i(pos) * (d_i . dm/dy(pos))``, ``y`` the dictionary's output hook, positions from `start`.

    The first-order estimate of m(model) - m(latent i zeroed) (attribution patching; Marks et al. 2024),
    and exactly dm/dk at k = 1 of the ``scale`` clamp (a test checks it by finite differences). One
    forward and one backward pass per batch; `batches`: equal-length `TaskBatch`es (clean prompts).
    """
    total, count = torch.zeros(d.d_sae, dtype=torch.float64), 0
    for batch in batches:
        store: dict[str, Tensor] = {}

        def grab(x: Tensor, hook: Any = None) -> Tensor:
            store["x"] = x.detach()
            return x

        def leaf(y: Tensor, hook: Any = None) -> Tensor:
            if d.hook_in == d.hook_out:
                store["x"] = y.detach()
            store["y"] = y.detach().requires_grad_(True)
            return store["y"]

        hooks = [(d.hook_out, leaf)] if d.hook_in == d.hook_out else [(d.hook_in, grab), (d.hook_out, leaf)]
        with torch.enable_grad():
            logits = model.run_with_hooks(batch.clean_tokens, return_type="logits", fwd_hooks=hooks)
            (grad,) = torch.autograd.grad(batch.metric(logits).sum(), store["y"])
        with torch.no_grad():
            a = d.encode(store["x"][:, d.start:])
            g = grad[:, d.start:] @ d.decoder.T.to(grad.dtype)
            total += (a * g).sum((0, 1)).double()
        count += len(batch)
    return total / max(count, 1)


def top_attributed(attribution: Tensor, n: int) -> list[tuple[int, float]]:
    """The `n` latents of largest |attribution|, with their attribution."""
    top = torch.argsort(attribution.abs(), descending=True)[:n].tolist()
    return [(int(i), float(attribution[i])) for i in top]
