"""``measured_costs.json``: per-token costs measured on one machine by ``benchmarks/costs.py``, which
`mechflow plan` and the workflow's per-rule resources extrapolate from (`mechflow.plan`).

The package ships the file measured on the project's reference machine
(``mechflow/plan/data/measured_costs.json``); ``make bench`` writes one for the machine it runs on
(``results/benchmarks/measured_costs.json``), which ``mechflow plan --costs`` reads.
"""

from __future__ import annotations

from pydantic import Field

from mechflow.contracts.documents import Document, VersionedDocument


class ForwardPoint(Document):
    """One timed forward measurement: TransformerLens forward passes stopped after `layers` blocks."""

    layers: int = Field(description="blocks run (stop_at_layer)")
    tokens: int
    seconds: float
    flops_per_token: float = Field(description="ModelShape.forward_flops(ctx, layers, unembed=False)")


class HarvestPoint(Document):
    """One harvest run (the harvest stage end to end, in its own process)."""

    tokens: int
    hooks: list[str]
    stop_layer: int = Field(description="blocks the forward needed (deepest hook's layer + 1)")
    stored_values_per_token: int = Field(description="sum of the hooks' widths")
    shard_rows: int
    seconds: float
    peak_rss_mb: float = Field(description="peak resident memory of the harvest process (ru_maxrss)")
    disk_bytes: int = Field(description="bytes of the written shards")


class TrainingPoint(Document):
    """One dictionary training run (the train_sae stage function, in its own process)."""

    tokens: int = Field(description="training tokens")
    d_in: int
    d_sae: int
    corpus_tokens: int = Field(description="tokens of the harvest it reads")
    seconds: float
    peak_rss_mb: float


class MeasuredCosts(VersionedDocument):
    """Per-token costs of one machine, and the runs they were fitted from."""

    machine: str = Field(description="platform, CPU count and torch threads of the measuring machine")
    commit: str = Field(description="git commit the measurement ran at")
    measured_on: str = Field(description="date (UTC, ISO 8601)")
    model: str = Field(description="the model measured (mechflow name)")
    context_size: int
    threads: int = Field(description="torch threads of every measurement")
    forward_flops_per_s: float = Field(description="forward FLOPs per second (fitted to the forward points)")
    harvest_startup_s: float = Field(description="seconds of a harvest job that do not scale with tokens (imports, "
                                     "model load, manifests)")
    write_seconds_per_value: float = Field(description="harvest's cost per stored activation value beyond the "
                                           "forward (copy, encode, zstd, write, sha256), fitted to harvest points")
    stored_bytes_per_value: float = Field(description="shard bytes per stored activation value (float32, zstd)")
    training_startup_s: float = Field(description="seconds of a training job that do not scale with tokens")
    training_flops_per_s: float = Field(description="dictionary training FLOPs per second (12·d_in·d_sae per "
                                        "token: encoder and decoder, forward and backward)")
    training_seconds_per_token: float = Field(description="per-token training cost independent of the width "
                                              "(reading shards, shuffling, optimizer bookkeeping)")
    base_rss_mb: float = Field(description="resident memory of a process that imported torch, transformer-lens "
                               "and mechflow, before any model is loaded")
    load_rss_factor: float = Field(description="peak resident memory of loading the model and running it, "
                                   "beyond base_rss_mb, per byte of weights")
    training_buffer_copies: float = Field(description="shuffle-buffer-sized arrays (rows x d_in float32) held at "
                                          "the training's peak (the group read, concatenated, filtered, permuted, "
                                          "and the next group prefetched)")
    training_batch_copies: float = Field(description="batch x d_sae float32 arrays held at the training's peak "
                                         "(pre-activations, activations, their gradients, the auxiliary loss')")
    forward: list[ForwardPoint]
    harvest: list[HarvestPoint]
    training: list[TrainingPoint]
