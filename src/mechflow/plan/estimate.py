"""Estimate the time, memory and disk of a run's token-scaled stages from measured per-token costs.

Every estimate is ``measured rate × arithmetic of the shapes`` (`mechflow.plan.shapes`), with the
rates of `MeasuredCosts` (``benchmarks/costs.py`` measures them on one machine):

* **harvest** ``seconds = startup + tokens · (F_fwd(stop_layer) / forward_flops_per_s
  + Σ widths · write_seconds_per_value)``
  where ``F_fwd`` is `ModelShape.forward_flops` through the deepest harvested block (no unembedding);
  **disk** ``tokens · Σ widths · stored_bytes_per_value``; **peak memory**
  ``base_rss + load_rss_factor · weights + shard buffers + forward activations``, shard buffers
  ``2 · shard_rows · Σ widths · 4 B`` (the shard's array and its Arrow table while it is written),
  activations ``2 · batch · ctx · (4·d_model + 3·d_mlp + n_heads·ctx) · 4 B`` (one block's
  intermediates, kept twice while the next is computed). None of these grow with the corpus: the
  harvest holds one shard per hook at a time (`mechflow.harvest.core`).
* **dictionary training** ``seconds = startup + tokens · (training_seconds_per_token + 6·d_sae·(d_in + d_out) /
  training_flops_per_s)`` (encoder and decoder, forward + backward = 3 × forward); **peak memory**
  ``base_rss + 16 B · n_params`` (weights, gradients and Adam's two moments)
  ``+ c_buf · min(buffer_rows, tokens) · d_in · 4 B`` (copies of the shuffle buffer, which never holds more
  rows than the training reads) ``+ c_batch · batch · d_sae · 4 B`` (batch-sized latent arrays), with
  the two copy counts fitted to the measured trainings (`MeasuredCosts`); **disk**
  ``4 B · n_params · (1 + n_checkpoints)``.
* **model-loading stages** (attribution, circuits, graphs, …) are sized relative to their measured
  SmolLM2 values by the ratio of forward FLOPs per token (time) and of weights (memory):
  `model_stage_estimate`.

`tests/unit/plan` checks the arithmetic against exact references (torch's FLOP counter, parameter
counts) and every formula against every measured point; docs/plan.md prints the points beside their
estimates and the table from 135M to 70B parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mechflow.contracts.hooks import hook_layer
from mechflow.contracts.plan import MeasuredCosts
from mechflow.plan.shapes import BYTES, ModelShape

MB = 1024 * 1024


@dataclass(frozen=True)
class StageEstimate:
    """What one stage of a run is expected to cost on the measured machine."""

    stage: str
    seconds: float
    peak_mb: float
    disk_bytes: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


def loaded_weight_bytes(shape: ModelShape, dtype: str = "float32") -> int:
    """Bytes of the weights a TransformerLens model holds (its W_E and W_U are separate tensors even
    when the checkpoint ties them)."""
    extra = shape.d_vocab * shape.d_model if shape.tied_embeddings else 0
    return (shape.params + extra) * BYTES[dtype]


def harvest_estimate(shape: ModelShape, costs: MeasuredCosts, *, tokens: int, hooks: list[str], ctx: int,
                     batch_size: int, shard_rows: int, dtype: str = "float32") -> StageEstimate:
    """Harvest of `tokens` tokens at `hooks` (TransformerLens names) in contexts of `ctx` tokens."""
    layers = [hook_layer(h) for h in hooks]
    stop = None if any(layer is None for layer in layers) else max(layers) + 1
    flops = shape.forward_flops(ctx, stop, unembed=stop is None)
    widths = sum(shape.width_of(h) for h in hooks)
    seconds = costs.harvest_startup_s + tokens * (flops / costs.forward_flops_per_s
                                                  + widths * costs.write_seconds_per_value)
    buffers = 2 * min(shard_rows, tokens) * widths * 4
    acts = 2 * batch_size * ctx * (4 * shape.d_model + 3 * shape.d_mlp + shape.n_heads * ctx) * 4
    weights = loaded_weight_bytes(shape, dtype)
    peak = costs.base_rss_mb * MB + costs.load_rss_factor * weights + buffers + acts
    return StageEstimate("harvest", seconds, peak / MB, tokens * widths * costs.stored_bytes_per_value, {
        "forward_flops_per_token": flops, "stop_layer": stop, "stored_values_per_token": widths,
        "weights_mb": weights / MB, "shard_buffers_mb": buffers / MB, "activations_mb": acts / MB})


def training_estimate(costs: MeasuredCosts, *, stage: str, tokens: int, d_in: int, d_sae: int, d_out: int | None = None,
                      buffer_rows: int, batch_size: int, n_checkpoints: int = 0) -> StageEstimate:
    """Training one dictionary (SAE: ``d_out = d_in``; transcoder: the output hook's width)."""
    d_out = d_in if d_out is None else d_out
    flops = 6 * d_sae * (d_in + d_out)
    seconds = costs.training_startup_s + tokens * (costs.training_seconds_per_token
                                                   + flops / costs.training_flops_per_s)
    n_params = dictionary_params(d_in, d_sae, d_out)
    peak = costs.base_rss_mb * MB + training_arrays_bytes(
        n_params, d_in=d_in, d_sae=d_sae, buffer_rows=min(buffer_rows, tokens), batch_size=batch_size,
        buffer_copies=costs.training_buffer_copies, batch_copies=costs.training_batch_copies)
    return StageEstimate(stage, seconds, peak / MB, 4 * n_params * (1 + n_checkpoints), {
        "flops_per_token": flops, "n_params": n_params})


def training_arrays_bytes(n_params: int, *, d_in: int, d_sae: int, buffer_rows: int, batch_size: int,
                          buffer_copies: float, batch_copies: float) -> float:
    """Bytes of a dictionary training's arrays: parameters, gradients and Adam's two moments (float32),
    `buffer_copies` shuffle-buffer-sized arrays and `batch_copies` batch x d_sae arrays (both measured:
    `MeasuredCosts`)."""
    return 16 * n_params + buffer_copies * buffer_rows * d_in * 4 + batch_copies * batch_size * d_sae * 4


def dictionary_params(d_in: int, d_sae: int, d_out: int) -> int:
    """W_enc, W_dec, b_enc, b_dec and JumpReLU thresholds."""
    return d_sae * (d_in + d_out) + d_sae + d_out + d_sae


def model_stage_estimate(shape: ModelShape, reference: ModelShape, *, stage: str, ref_seconds: float, ref_mb: float,
                         work_ratio: float = 1.0, ctx: int = 128, dtype: str = "float32") -> StageEstimate:
    """A model-loading stage sized from its value on `reference` (SmolLM2): time × the ratio of forward
    FLOPs per token × `work_ratio` (e.g. prompts asked / prompts measured); memory: the reference's
    overhead beyond its weights, plus this model's weights × 3 (weights, activations and gradients of a
    backward pass through the whole model hold about that many weight-sized buffers)."""
    flops_ratio = shape.forward_flops(ctx) / reference.forward_flops(ctx)
    ref_weights = loaded_weight_bytes(reference, dtype) / MB
    weights = loaded_weight_bytes(shape, dtype) / MB
    peak = max(ref_mb - 3 * ref_weights, 0.0) + 3 * weights
    return StageEstimate(stage, ref_seconds * flops_ratio * work_ratio, peak, 0.0,
                         {"flops_ratio": flops_ratio, "work_ratio": work_ratio})


def mem_mb(estimate: StageEstimate, attempt: int = 1) -> int:
    """A cluster memory request for an estimate: 1.5 × the estimate + 1 GB, doubled on each retry
    (a job killed for memory comes back with more), rounded up to 500 MB."""
    mb = (1.5 * estimate.peak_mb + 1024) * 2 ** (attempt - 1)
    return int(math.ceil(mb / 500) * 500)


def runtime_min(estimate: StageEstimate, attempt: int = 1) -> int:
    """A cluster time limit in minutes: 2 × the estimate + 10 min, doubled on each retry."""
    return int(math.ceil((2 * estimate.seconds / 60 + 10) * 2 ** (attempt - 1)))
