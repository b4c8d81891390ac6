"""Causal tracing of factual recall (Meng et al. 2022, "Locating and editing factual associations
in GPT", ROME §2.1).

Steps:

1. Clean run: cache the states to restore (``blocks.L.hook_resid_pre`` for ``kind="resid"``,
   ``hook_mlp_out`` for ``"mlp"``, ``hook_attn_out`` for ``"attn"``) and the clean metric.
2. Corrupted run: add Gaussian noise ``N(0, sigma^2)`` to the token embeddings (``hook_embed``)
   of the SUBJECT positions only, ``sigma = noise_scale x std(W_E)`` (ROME: 3 x the standard
   deviation of the embeddings; here the std of all entries of the embedding matrix). Noise is
   drawn from ``torch.Generator().manual_seed(seed)``; ``n_samples`` draws are averaged and the
   SAME draw is used by the corrupted run and every restored run of that sample.
3. Restored runs: the corrupted run with the clean state put back at one (layer, position)
   (``window`` > 1: the clean states of ``window`` consecutive layers centred on the layer, as
   ROME does for MLP/attention), everything downstream recomputed.
4. Indirect effect ``IE[layer, pos] = m(restored) - m(corrupted)``, averaged over noise samples.
   ROME's metric is the probability of the correct answer: pass ``answer_probability(ids)`` as
   ``metric``; any per-prompt metric works (e.g. the task's logit difference).

Exactness identities (tested): restoring ``resid_pre 0`` at every position gives the clean
metric exactly (that state is the whole input); restoring nothing gives the corrupted metric.
Works unchanged on SmolLM2 and Gemma-3 (hooks only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import polars as pl
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechflow.attribution.config import CausalTracingConfig
from mechflow.contracts.hooks import COMPONENT_HOOKS
from mechflow.errors import ConfigError

log = logging.getLogger(__name__)

KIND_HOOKS = {k: COMPONENT_HOOKS[k] for k in ("resid", "mlp", "attn")}
Metric = Callable[[Tensor], Tensor]


def answer_probability(answer_ids: Tensor) -> Metric:
    """ROME's metric: softmax probability of each prompt's answer token at the last position."""
    def metric(logits: Tensor) -> Tensor:
        p = logits[:, -1].softmax(-1)
        return p[torch.arange(p.shape[0]), answer_ids.to(p.device)]
    return metric


def subject_mask(tokens: Tensor, subject_positions) -> Tensor:
    """``[n, pos]`` bool from a bool mask or one list of positions per prompt (or one shared list)."""
    if isinstance(subject_positions, Tensor) and subject_positions.dtype == torch.bool:
        mask = subject_positions
    else:
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        per_prompt = subject_positions
        if per_prompt and isinstance(per_prompt[0], int):
            per_prompt = [per_prompt] * tokens.shape[0]
        if len(per_prompt) != tokens.shape[0]:
            raise ConfigError(f"subject_positions: {len(per_prompt)} lists for {tokens.shape[0]} prompts")
        for i, positions in enumerate(per_prompt):
            mask[i, list(positions)] = True
    if mask.shape != tokens.shape or not mask.any(dim=1).all():
        raise ConfigError("subject_positions: need at least one subject position per prompt, "
                          f"mask shape {tuple(mask.shape)} vs tokens {tuple(tokens.shape)}")
    return mask


def noise_sigma(model, noise_scale: float = 3.0) -> float:
    """``noise_scale x std(W_E)`` (all entries of the embedding matrix)."""
    return float(noise_scale * model.W_E.detach().double().std())


@dataclass
class CausalTrace:
    """Result of `causal_trace`.

    Attributes:
        effects: ``[L, pos, n]`` indirect effect per (layer, position) and prompt.
        clean: ``[n]`` clean metric; corrupted: ``[n]`` mean corrupted metric over samples.
        kind, window, sigma, n_samples, seed: the setting.
    """

    effects: Tensor
    clean: Tensor
    corrupted: Tensor
    kind: str
    window: int
    sigma: float
    n_samples: int
    seed: int

    def to_frame(self) -> pl.DataFrame:
        """One row per (layer, position): component, layer, head (null), score (mean IE), method,
        position."""
        e = self.effects.mean(-1).double()
        rows = [{"component": f"{self.kind} L{l} P{p}", "layer": l, "head": None, "score": float(e[l, p]),
                 "method": f"causal_tracing_{self.kind}", "position": p}
                for l in range(e.shape[0]) for p in range(e.shape[1])]
        return pl.DataFrame(rows, schema={"component": pl.Utf8, "layer": pl.Int64, "head": pl.Int64,
                                          "score": pl.Float64, "method": pl.Utf8, "position": pl.Int64})


def _noise_hook(noise: Tensor, mask: Tensor, copies: int):
    def hook(act: Tensor, hook=None) -> Tensor:
        m = mask.repeat(copies, 1).unsqueeze(-1).to(act.dtype)
        return act + m * noise.repeat(copies, 1, 1).to(act.dtype)
    return hook


def run_restored(model, tokens: Tensor, noise: Tensor, mask: Tensor, restores: list[dict[int, list[int]]],
                 clean_states: dict[int, Tensor], kind: str, metric: Metric) -> Tensor:
    """Metric of noised runs, one per restore spec ``{layer: [positions]}`` -> ``[len(restores), n]``.

    Args:
        noise: ``[n, pos, d_model]`` noise (applied where ``mask``).
        restores: per copy, which clean states to put back (empty dict: the corrupted run).
        clean_states: layer -> clean ``[n, pos, d_model]`` state of ``kind``'s hook.
    """
    n = tokens.shape[0]
    c = len(restores)
    layers = sorted({l for r in restores for l in r})

    def restore(layer: int):
        def hook(act: Tensor, hook=None) -> Tensor:
            for j, spec in enumerate(restores):
                if spec.get(layer):
                    act[j * n:(j + 1) * n, spec[layer]] = clean_states[layer][:, spec[layer]]
            return act
        return hook

    hooks = [("hook_embed", _noise_hook(noise, mask, c))]
    hooks += [(f"blocks.{l}.{KIND_HOOKS[kind]}", restore(l)) for l in layers]
    with torch.no_grad():
        logits = model.run_with_hooks(tokens.repeat(c, 1), fwd_hooks=hooks)
    return torch.stack([metric(logits[j * n:(j + 1) * n]) for j in range(c)])


def causal_trace(model, tokens: Tensor, subject_positions, metric: Metric, kind: str = "resid", window: int = 1,
                 noise_scale: float = 3.0, n_samples: int = 1, seed: int = 0, layers: list[int] | None = None,
                 max_batch: int = 64, progress: bool = False) -> CausalTrace:
    """Indirect effect of restoring each (layer, position) clean state into the noised run.

    Args:
        tokens: ``[n, pos]`` prompts (all the same factual template length).
        subject_positions: bool mask ``[n, pos]`` or position lists (see `subject_mask`).
        metric: per-prompt metric of the logits (e.g. `answer_probability`).
        kind: ``resid`` | ``mlp`` | ``attn`` (module docstring, step 1).
        window: layers restored together, centred (ROME uses 10 for mlp/attn, 1 for resid).
        layers: layers to trace (default all); other rows are 0.
    """
    CausalTracingConfig(kinds=(kind,), window=window, n_samples=n_samples)  # the group's own checks, stated once
    mask = subject_mask(tokens, subject_positions)
    n, n_pos = tokens.shape
    L = model.cfg.n_layers
    layers = list(range(L)) if layers is None else list(layers)
    names = {f"blocks.{l}.{KIND_HOOKS[kind]}" for l in range(L)}
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda x: x in names)
    clean_states = {l: cache[f"blocks.{l}.{KIND_HOOKS[kind]}"] for l in range(L)}
    m_clean = metric(logits)
    sigma = noise_sigma(model, noise_scale)
    gen = torch.Generator().manual_seed(seed)
    effects = torch.zeros(L, n_pos, n, dtype=torch.float64)
    corrupted = torch.zeros(n, dtype=torch.float64)
    cells = [(l, p) for l in layers for p in range(n_pos)]
    copies = max(1, max_batch // n)
    for _ in range(n_samples):
        noise = torch.randn(n, n_pos, model.cfg.d_model, generator=gen, dtype=torch.float64) * sigma
        m_corr = run_restored(model, tokens, noise, mask, [{}], clean_states, kind, metric)[0]
        corrupted += m_corr.double() / n_samples
        for start in tqdm(range(0, len(cells), copies), disable=not progress, desc="causal tracing"):
            chunk = cells[start:start + copies]
            specs = []
            for l, p in chunk:
                lo, hi = max(0, l - window // 2), min(L, l - window // 2 + window)
                specs.append({k: [p] for k in range(lo, hi)})
            m = run_restored(model, tokens, noise, mask, specs, clean_states, kind, metric)
            for (l, p), v in zip(chunk, m):
                effects[l, p] += (v - m_corr).double() / n_samples
    return CausalTrace(effects, m_clean.detach().double(), corrupted, kind, window, sigma, n_samples, seed)
