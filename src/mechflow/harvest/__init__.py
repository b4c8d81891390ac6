"""Harvest stage: activations at TransformerLens hooks → sharded Parquet, plus lazy readers."""

from mechflow.harvest.config import HOOK_POINTS, HarvestConfig
from mechflow.harvest.core import harvest
from mechflow.harvest.hooks import capture, expand_hooks, stop_layer
from mechflow.harvest.shards import (
    activation_dataset,
    decode_activations,
    iter_activation_batches,
    load_manifest,
    plan_shards,
    resolve_manifest,
    scan_activations,
    shard_paths,
    verify_shards,
)

__all__ = ["HOOK_POINTS", "HarvestConfig", "activation_dataset", "capture", "decode_activations", "expand_hooks",
           "harvest", "iter_activation_batches", "load_manifest", "plan_shards", "resolve_manifest",
           "scan_activations", "shard_paths", "stop_layer", "verify_shards"]
