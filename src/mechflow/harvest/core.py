"""Harvest stage: run the model over the corpus once and store activations at many hooks.

1. Validate config, tokens and hook names against the model (nothing is written before this).
2. Split contexts into shards of whole contexts (deterministic from `shard_rows`), find shards
   already complete on disk (sidecar + sha256, see ``mechflow.harvest.shards``).
3. For each shard still missing at some hook: run one forward pass per batch of `batch_size`
   contexts, caching only the hooks needed and stopping after the deepest hook's block
   (``stop_at_layer``); copy activations into the shard's preallocated buffer; write it
   atomically with its sidecar. Memory is bounded by one shard per hook, whatever the corpus size.
4. Write each hook's ``_manifest.json`` (HarvestManifest), then the index (HarvestIndex), last.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mechflow.contracts.documents import write_document
from mechflow.contracts.filenames import SHARD_MANIFEST
from mechflow.contracts.harvest import HarvestIndex, HarvestManifest, ShardInfo
from mechflow.contracts.versions import SCHEMA_VERSION
from mechflow.corpus.core import read_contexts
from mechflow.errors import DataError
from mechflow.harvest import shards
from mechflow.harvest.config import HarvestConfig
from mechflow.harvest.hooks import capture, expand_hooks, hook_layer, stop_layer
from mechflow.io import canonical_hash, sha256_file
from mechflow.models.config import ModelConfig

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ModelInfo:
    name: str
    sha256: str | None
    dtype: str
    prepend_bos: bool
    bos_token_id: int | None
    backend: str = "transformer_lens"


def _identity(info: ModelInfo) -> dict:
    """What identifies the model in shard keys and config hashes; the backend only when it is hf, so
    TransformerLens harvests keep the keys (and resume) they had before backends existed."""
    ident = asdict(info)
    if ident["backend"] == "transformer_lens":
        del ident["backend"]
    return ident


def resolve_model(model_cfg: dict, model: Any = None) -> tuple[Any, ModelInfo]:
    """The model to run (HookedTransformer or HookedHF) and what identifies it (a LoadedModel, a bare
    model or the config). Harvest needs only hooks, so both backends serve."""
    from mechflow.models import LoadedModel, load_model_from_cfg
    from mechflow.models.hf import HookedHF
    from mechflow.models.registry import ANY_BACKEND

    if model is None:
        model = load_model_from_cfg(model_cfg, stage="harvest", backends=ANY_BACKEND)
    if isinstance(model, LoadedModel):
        card = model.card
        return model.model, ModelInfo(card.name, card.source_sha256, card.dtype, card.prepend_bos, card.bos_token_id,
                                      card.backend)
    # A bare HookedTransformer (tests, notebooks): identify it by a hash of its weights.
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    name = model_cfg.get("name") or model.cfg.model_name
    dtype = str(model.cfg.dtype).removeprefix("torch.")
    prepend_bos = model_cfg.get("prepend_bos", ModelConfig.field_defaults()["prepend_bos"])
    backend = "hf" if isinstance(model, HookedHF) else "transformer_lens"
    return model, ModelInfo(name, h.hexdigest(), dtype, bool(prepend_bos), None, backend)


def check_contexts(contexts: np.ndarray, model: Any, info: ModelInfo, tokens: Path) -> None:
    """Token ids fit the model's vocabulary and context window, BOS convention matches."""
    if contexts.max() >= model.cfg.d_vocab or contexts.min() < 0:
        raise DataError(f"{tokens}: token id {int(contexts.max())} is outside the vocabulary of {info.name} "
                        f"(d_vocab={model.cfg.d_vocab}); rerun the corpus stage with this model's tokenizer")
    if contexts.shape[1] > model.cfg.n_ctx:
        raise DataError(f"{tokens}: contexts of {contexts.shape[1]} tokens exceed {info.name}'s n_ctx="
                        f"{model.cfg.n_ctx}; lower corpus.context_size")
    if info.prepend_bos and info.bos_token_id is not None and np.any(contexts[:, 0] != info.bos_token_id):
        raise DataError(f"{tokens}: contexts do not start with BOS id {info.bos_token_id} although "
                        f"model.prepend_bos is set; rerun the corpus stage with the same model config")


def harvest(cfg: HarvestConfig | Mapping[str, Any], *, model_cfg: dict, tokens: Path, index: Path, harvest_dir: Path,
            loaded_model: Any = None) -> dict:
    """Write activations at the configured hooks for every token of `tokens`.

    Args:
        cfg: the `harvest` config group (see ``HarvestConfig``).
        model_cfg: the `model` config group.
        tokens: `tokens.parquet` from the corpus stage.
        index: output JSON listing each hook's manifest (relative to `harvest_dir`) and its sha256.
        harvest_dir: folder of one sub-folder per hook (shards survive a kill; reruns resume).
        loaded_model: an already loaded LoadedModel or bare HookedTransformer (default: load `model_cfg`).

    Returns:
        A summary (hooks, rows, shards written/kept, seconds, tokens per second).
    """
    hcfg = HarvestConfig.from_dict(cfg)
    tokens, index, harvest_dir = Path(tokens), Path(index), Path(harvest_dir)
    contexts = read_contexts(tokens)[: hcfg.max_contexts]
    net, info = resolve_model(model_cfg, loaded_model)
    hooks = expand_hooks(hcfg, net)
    check_contexts(contexts, net, info, tokens)
    plans = shards.plan_shards(len(contexts), contexts.shape[1], hcfg.shard_rows)
    corpus_sha = sha256_file(tokens)
    keys = {h: _plan_keys(hcfg, info, corpus_sha, h, contexts.shape[1], plans) for h in hooks}
    index.unlink(missing_ok=True)  # a stale index must not vouch for shards being rewritten
    done, todo = _find_done(harvest_dir, hooks, plans, keys)
    stats = _write_missing(net, hcfg, contexts, harvest_dir, plans, todo, done, keys)
    manifests = {h: _write_manifest(net, harvest_dir / h, h, hcfg, info, corpus_sha, contexts, plans, done[h])
                 for h in hooks}
    _write_index(index, harvest_dir, info, corpus_sha, contexts, manifests, _hook_modules(net, hooks))
    return {"hooks": hooks, "n_contexts": len(contexts), "n_rows_per_hook": int(contexts.size),
            "index": str(index), **stats}


def _plan_keys(cfg: HarvestConfig, info: ModelInfo, corpus_sha: str, hook: str, context_size: int,
               plans: list[shards.ShardPlan]) -> list[str]:
    # Everything that changes a shard's bytes; batch_size is in because batched matmuls round differently.
    base = {"model": _identity(info), "corpus_sha256": corpus_sha, "hook": hook, "dtype": cfg.dtype,
            "batch_size": cfg.batch_size, "compression_level": cfg.compression_level,
            "row_group_rows": cfg.row_group_rows, "context_size": context_size}
    return [canonical_hash({**base, "contexts": [p.first_context, p.stop_context]}) for p in plans]


def _find_done(harvest_dir: Path, hooks: list[str], plans: list[shards.ShardPlan], keys: dict[str, list[str]]):
    done: dict[str, dict[int, tuple[ShardInfo, int]]] = {}
    todo: dict[int, list[str]] = {}
    for hook in hooks:
        folder = harvest_dir / hook
        done[hook] = {}
        if folder.exists():
            shards.remove_stale(folder, len(plans))
        for plan in plans:
            found = shards.completed_shard(folder, plan, keys[hook][plan.index]) if folder.exists() else None
            if found is None:
                todo.setdefault(plan.index, []).append(hook)
            else:
                done[hook][plan.index] = found
        if len(done[hook]) < len(plans):
            (folder / SHARD_MANIFEST).unlink(missing_ok=True)
    kept = sum(len(v) for v in done.values())
    if kept:
        log.info("resuming: %d shard(s) verified and kept, %d shard(s) to write", kept, sum(map(len, todo.values())))
    return done, todo


def _write_missing(net, cfg: HarvestConfig, contexts: np.ndarray, harvest_dir: Path, plans, todo, done, keys) -> dict:
    ctx = contexts.shape[1]
    total = sum((plans[i].stop_context - plans[i].first_context) * ctx for i in todo)
    start, written = time.perf_counter(), 0
    with tqdm(total=total, unit="tok", unit_scale=True, desc="harvest", disable=not cfg.progress) as bar:
        for i in sorted(todo):
            plan, hooks = plans[i], todo[i]
            stop = stop_layer(hooks, net.cfg.n_layers)
            buffers: dict[str, np.ndarray] = {}
            for a in range(plan.first_context, plan.stop_context, cfg.batch_size):
                b = min(a + cfg.batch_size, plan.stop_context)
                acts = capture(net, torch.from_numpy(contexts[a:b]), hooks, stop)
                for hook, act in acts.items():
                    enc = shards.encode_activations(act.reshape(-1, act.shape[-1]), cfg.dtype)
                    if hook not in buffers:  # width known only now: preallocate the whole shard once
                        rows = (plan.stop_context - plan.first_context) * ctx
                        buffers[hook] = np.empty((rows, enc.shape[1]), dtype=enc.dtype)
                    r0 = (a - plan.first_context) * ctx
                    buffers[hook][r0 : r0 + enc.shape[0]] = enc
                bar.update((b - a) * ctx)
            ids = np.arange(plan.first_context, plan.stop_context)
            for hook in hooks:
                table = shards.shard_table(ids, contexts[plan.first_context : plan.stop_context], buffers[hook],
                                           cfg.dtype)
                info = shards.write_shard(harvest_dir / hook, plan, table, plan_key=keys[hook][i],
                                          compression_level=cfg.compression_level, row_group_rows=cfg.row_group_rows)
                done[hook][i] = (info, buffers[hook].shape[1])
                written += 1
    seconds = time.perf_counter() - start
    log.info("harvested %d tokens in %.1fs (%.0f tok/s), %d shard file(s) written", total, seconds,
             total / seconds if seconds else 0.0, written)
    return {"shards_written": written, "shards_kept": sum(len(v) for v in done.values()) - written,
            "tokens_processed": total, "seconds": seconds, "tokens_per_second": total / seconds if total else None}


def _hook_modules(net: Any, hooks: list[str]) -> dict[str, str]:
    """Backend hf: each hook's HF module (``HookedHF.hook_modules``); empty for TransformerLens."""
    modules = getattr(net, "hook_modules", None)
    return {h: modules[h] for h in hooks} if isinstance(modules, dict) else {}


def _write_manifest(net: Any, folder: Path, hook: str, cfg: HarvestConfig, info: ModelInfo, corpus_sha: str,
                    contexts: np.ndarray, plans, done: dict[int, tuple[ShardInfo, int]]) -> HarvestManifest:
    widths = {d for _, d in done.values()}
    if len(widths) != 1:
        raise DataError(f"{folder}: shards disagree on the activation width {sorted(widths)}; "
                        "delete the folder and rerun")
    manifest = HarvestManifest(
        model=info.name, model_sha256=info.sha256, hook=hook, layer=hook_layer(hook), d=widths.pop(),
        dtype=cfg.dtype, context_size=int(contexts.shape[1]), prepend_bos=info.prepend_bos,
        corpus_sha256=corpus_sha, n_contexts=len(contexts), n_rows=int(contexts.size),
        shards=[done[p.index][0] for p in plans],
        config_hash=canonical_hash({"harvest": asdict(cfg), "model": _identity(info), "corpus_sha256": corpus_sha}),
        backend=info.backend, hook_module=_hook_modules(net, [hook]).get(hook),
    )
    write_document(folder / SHARD_MANIFEST, HarvestManifest, manifest)
    return manifest


def _write_index(index: Path, harvest_dir: Path, info: ModelInfo, corpus_sha: str, contexts: np.ndarray,
                 manifests: dict[str, HarvestManifest], hook_modules: dict[str, str]) -> None:
    entries = []
    for hook, m in manifests.items():
        rel = f"{hook}/{SHARD_MANIFEST}"
        entries.append({"hook": hook, "layer": m.layer, "d": m.d, "n_rows": m.n_rows, "n_shards": len(m.shards),
                        "manifest": rel, "sha256": sha256_file(harvest_dir / rel)})
    write_document(index, HarvestIndex, {
        "schema_version": SCHEMA_VERSION, "model": info.name, "model_sha256": info.sha256,
        "corpus_sha256": corpus_sha, "n_contexts": len(contexts), "context_size": int(contexts.shape[1]),
        "harvest_dir": os.path.relpath(harvest_dir, index.parent), "hooks": entries,
        "backend": info.backend, "hook_modules": hook_modules or None,
    })
