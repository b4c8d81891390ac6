"""The feature analysis of the `features` stage run on the transcoder set (rule `transcoder_features`).

What each feature of every layer's transcoder reads and writes, for the graph viewer (a hovered
feature shows its top activating corpus contexts and logit effects) and for people browsing the
set. The same steps and config group (`features`) as the SAE's analysis, with two differences:

- **Source of activations**: the set's harvest shards are `temp()` (deleted once the layers are
  trained), so instead of streaming shards this stage runs the model over the corpus contexts
  (`tokens.parquet`, in order, up to `features.max_tokens` tokens; null: all) with one hook per
  layer on the transcoders' input hook, and encodes every layer from the same forward pass. As in
  training (`exclude_bos`), position 0 of each context is not a row.
- **No task attribution**: a transcoder replaces an MLP's output rather than reconstructing its
  input, so the SAE splice of `mechflow.features.attribution` does not apply; feature effects on a
  task's output are what the attribution graphs (`mechflow.graphs`) measure.

Steps: 1. per-layer running statistics (`FeatureStatsAccumulator`: top-k contexts, firing counts,
histograms); 2. logit effects of each layer's decoder directions through the final norm and W_U
(`mechflow.features.logits`; a transcoder writes ``hook_mlp_out``, the residual basis); 3. records
of ``ceil(n_features / n_layers)`` features per layer (`select_features`), decoded windows.

Outputs (atomic): `top_contexts.parquet` (every live feature's top contexts,
`TRANSCODER_TOP_CONTEXTS_SCHEMA`: the graph viewer reads it), `feature_stats.parquet` (one row per
(layer, feature), `TRANSCODER_FEATURE_STATS_SCHEMA`), `features.jsonl` (one `FeatureRecord` per
selected feature, with its `layer`), `features.html`, `summary.json` (`TranscoderFeaturesSummary`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from mechflow.contracts.dictionaries import TranscoderSetDocument
from mechflow.contracts.documents import load_document, write_document
from mechflow.contracts.features import TranscoderFeaturesSummary
from mechflow.contracts.parquet import TRANSCODER_FEATURE_STATS_SCHEMA, TRANSCODER_TOP_CONTEXTS_SCHEMA, write_table
from mechflow.errors import ConfigError
from mechflow.features.config import FeaturesConfig
from mechflow.features.logits import logit_effects
from mechflow.features.records import build_records, read_windows, select_features, token_decoder, write_feature_records
from mechflow.features.render import render_html
from mechflow.features.stats import FeatureStats, FeatureStatsAccumulator
from mechflow.io import atomic_write_text

log = logging.getLogger(__name__)


@torch.no_grad()
def set_feature_stats(model, transcoders, contexts: np.ndarray, *, k: int, batch_rows: int,
                      max_tokens: int | None, progress: bool = True) -> dict[int, FeatureStats]:
    """Step 1: per-layer `FeatureStats` over the corpus contexts (position 0 excluded), one forward
    pass per batch of contexts with every layer's transcoder input captured."""
    layers = sorted(transcoders.transcoders)
    T = contexts.shape[1]
    if T < 2:
        raise ConfigError(f"corpus contexts have {T} token(s): the transcoder features need at least 2 "
                          "(position 0 is not a row); raise corpus.context_size")
    per_context = T - 1
    n_contexts = len(contexts) if max_tokens is None else min(len(contexts), math.ceil(max_tokens / per_context))
    batch = max(1, batch_rows // per_context)
    accs = {layer: FeatureStatsAccumulator(transcoders.transcoders[layer].d_sae, k) for layer in layers}
    names = {transcoders.hook_in(layer): layer for layer in layers}
    captured: dict[int, torch.Tensor] = {}

    def capture(value, hook):
        captured[names[hook.name]] = value[:, 1:]
        return value

    positions = torch.arange(1, T).repeat(batch)
    bar = tqdm(total=n_contexts * per_context, desc="transcoder feature stats", unit="tok", disable=not progress)
    dtype = next(iter(transcoders.transcoders.values())).W_enc.dtype
    for start in range(0, n_contexts, batch):
        ids = torch.as_tensor(contexts[start:min(start + batch, n_contexts)])
        b = len(ids)
        captured.clear()
        model.run_with_hooks(ids, fwd_hooks=[(name, capture) for name in names], stop_at_layer=max(layers) + 1)
        ctx = torch.arange(start, start + b).repeat_interleave(per_context)
        pos = positions[: b * per_context]
        for layer in layers:
            x = captured[layer].reshape(b * per_context, -1).to(dtype)
            accs[layer].add(transcoders.transcoders[layer].encode(x), ctx, pos)
        bar.update(b * per_context)
    bar.close()
    return {layer: acc.result(f"layer {layer}'s corpus rows", "check the corpus tokens file")
            for layer, acc in accs.items()}


def top_contexts_table(stats: Mapping[int, FeatureStats]) -> pa.Table:
    """Every live feature's top contexts: (layer, feature, rank, activation, context_id, position)."""
    cols: dict[str, list[np.ndarray]] = {name: [] for name in TRANSCODER_TOP_CONTEXTS_SCHEMA.names}
    for layer, s in sorted(stats.items()):
        k = s.top_values.shape[0]
        rank, feature = torch.nonzero(s.top_values > 0, as_tuple=True)
        order = torch.argsort(feature * k + rank)
        rank, feature = rank[order], feature[order]
        cols["layer"].append(np.full(len(rank), layer, dtype=np.int32))
        cols["feature"].append(feature.numpy().astype(np.int32))
        cols["rank"].append(rank.numpy().astype(np.int32))
        cols["activation"].append(s.top_values[rank, feature].float().numpy())
        cols["context_id"].append(s.top_context[rank, feature].numpy().astype(np.int64))
        cols["position"].append(s.top_position[rank, feature].numpy().astype(np.int32))
    return pa.table({name: np.concatenate(v) for name, v in cols.items()}, schema=TRANSCODER_TOP_CONTEXTS_SCHEMA)


def feature_stats_table(stats: Mapping[int, FeatureStats]) -> pa.Table:
    """One row per (layer, feature): firing count and frequency, mean and max activation when active."""
    rows: dict[str, list[np.ndarray]] = {name: [] for name in TRANSCODER_FEATURE_STATS_SCHEMA.names}
    for layer, s in sorted(stats.items()):
        d = s.count.shape[0]
        count = s.count.numpy()
        rows["layer"].append(np.full(d, layer, dtype=np.int32))
        rows["feature"].append(np.arange(d, dtype=np.int32))
        rows["n_active"].append(count.astype(np.int64))
        rows["frequency"].append(count / max(s.n_tokens, 1))
        rows["mean_active"].append(np.where(count > 0, s.sum.numpy() / np.maximum(count, 1), 0.0))
        rows["max"].append(np.where(count > 0, s.max.double().numpy(), 0.0))
    return pa.table({name: np.concatenate(v) for name, v in rows.items()}, schema=TRANSCODER_FEATURE_STATS_SCHEMA)


def transcoder_features(cfg: FeaturesConfig | Mapping[str, Any] | None, *, transcoder_set: Path, tokens: Path,
                        top_contexts: Path, feature_stats: Path, features: Path, html: Path, summary: Path,
                        model_cfg: Mapping[str, Any] | None = None, loaded_model: Any = None) -> dict[str, Any]:
    """Stage function of rule `transcoder_features` (module docstring).

    Args:
        cfg: the `features` config group (`tasks`, `n_prompts`, `ablation`, `error_term`, `n_verify`
            and `max_batch` concern the SAE's task attribution and are not used here).
        transcoder_set: `dictionaries/transcoder_set/set.json` (written by rule `transcoder_set`).
        tokens: the corpus `tokens.parquet`.
        top_contexts, feature_stats, features, html, summary: output paths.
        model_cfg: the `model` group; `loaded_model`: an already loaded one (tests).
    """
    from mechflow.corpus.core import read_contexts
    from mechflow.graphs.replacement import TranscoderSet

    c = FeaturesConfig.from_dict(cfg)
    t0 = time.perf_counter()
    set_doc = load_document(transcoder_set, TranscoderSetDocument, fix="re-run transcoder_set")
    if loaded_model is None:
        from mechflow.models import load_model_from_cfg

        if not model_cfg:
            raise ConfigError("the transcoder_features stage needs model_cfg (the `model` group) to load the model")
        loaded_model = load_model_from_cfg(dict(model_cfg))
    model, tokenizer = loaded_model.model, loaded_model.tokenizer
    transcoders = TranscoderSet.from_folders([Path(f) for f in set_doc["folders"]])
    transcoders.check(model)
    transcoders = transcoders.to(model.cfg.dtype)
    contexts = read_contexts(Path(tokens))
    stats = set_feature_stats(model, transcoders, contexts, k=c.top_contexts, batch_rows=c.batch_rows,
                              max_tokens=c.max_tokens)

    n_layers = len(stats)
    per_layer_n = None if c.n_features is None else math.ceil(c.n_features / n_layers)
    layer_cfg = dataclasses.replace(c, n_features=per_layer_n)
    decode = token_decoder(tokenizer)
    chosen = {layer: select_features(s, layer_cfg, []) for layer, s in stats.items()}
    windows = read_windows(Path(tokens), {cid for layer, fs in chosen.items() for f in fs
                                          for _, cid, _ in stats[layer].top_contexts(f)})
    records, per_layer = [], []
    folder_of = dict(zip(set_doc["layers"], set_doc["folders"], strict=True))
    for layer, s in sorted(stats.items()):
        tc = transcoders.transcoders[layer]
        effects = logit_effects(model, tc.W_dec, chosen[layer], c.n_logits)
        base = {"hook": transcoders.hook_out(layer), "layer": layer, "model": model.cfg.model_name,
                "architecture": f"{set_doc['kind']} transcoder", "dictionary": str(folder_of.get(layer, ""))}
        records += build_records(s, chosen[layer], windows, c.window, decode, effects, {}, base)
        n_live = int(s.live.sum())
        per_layer.append({"layer": layer, "d_sae": tc.d_sae, "n_live": n_live, "dead_fraction": 1 - n_live / tc.d_sae,
                          "mean_l0": float(s.count.sum()) / max(s.n_tokens, 1), "n_records": len(chosen[layer])})
    n_tokens = next(iter(stats.values())).n_tokens
    result = {"stage": "transcoder_features", "model": model.cfg.model_name, "transcoder_set": str(transcoder_set),
              "kind": set_doc["kind"], "n_layers": n_layers, "n_tokens": n_tokens, "config": c.to_dict(),
              "per_layer": per_layer, "n_records": len(records),
              "files": {"top_contexts": str(top_contexts), "feature_stats": str(feature_stats),
                        "features": str(features), "html": str(html)},
              "seconds": round(time.perf_counter() - t0, 3)}
    write_table(top_contexts_table(stats), top_contexts, TRANSCODER_TOP_CONTEXTS_SCHEMA)
    write_table(feature_stats_table(stats), feature_stats, TRANSCODER_FEATURE_STATS_SCHEMA)
    write_feature_records(records, Path(features))
    page = {"hook": f"{transcoders.in_hook} → {transcoders.out_hook}", "model": model.cfg.model_name,
            "dictionary_kind": "transcoder", "token_source": "corpus",
            "architecture": f"{n_layers}-layer set of {set_doc['kind']}",
            "d_in": next(iter(transcoders.transcoders.values())).d_in, "d_sae": set_doc["d_sae"],
            "dictionary": str(transcoder_set), "n_tokens": n_tokens,
            "n_live": sum(p["n_live"] for p in per_layer),
            "n_dead": sum(p["d_sae"] - p["n_live"] for p in per_layer), "tasks": []}
    atomic_write_text(html, render_html(records, page, None))
    write_document(summary, TranscoderFeaturesSummary, result)
    log.info("transcoder features: %d layers over %d tokens, %d records -> %s", n_layers, n_tokens, len(records),
             features)
    return result
