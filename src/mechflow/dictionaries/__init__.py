"""Sparse dictionaries: SAEs (trained with SAELens) and transcoders, from Parquet activation shards."""

from mechflow.dictionaries.config import DataConfig, EvalConfig, SAEConfig, TranscoderConfig
from mechflow.dictionaries.data import ActivationStream, ShardSource, load_manifest, split_shards
from mechflow.dictionaries.evaluate import evaluate_dictionary, evaluate_sae, evaluate_transcoder
from mechflow.dictionaries.metrics import ce_metrics, reconstruction_metrics
from mechflow.dictionaries.sae import load_pretrained_sae, load_sae, train_sae
from mechflow.dictionaries.transcoder import JumpReLUTranscoderStack, load_transcoder, train_transcoder

__all__ = [
    "ActivationStream", "DataConfig", "JumpReLUTranscoderStack", "load_transcoder", "train_transcoder", "EvalConfig",
    "SAEConfig", "ShardSource", "TranscoderConfig",
    "ce_metrics", "evaluate_dictionary", "evaluate_sae", "evaluate_transcoder", "load_manifest",
    "load_pretrained_sae", "load_sae", "reconstruction_metrics", "split_shards", "train_sae",
]
