"""The evaluation stages of the dictionaries: `evaluate_sae` (rule `evaluate_sae`) and
`evaluate_transcoder` (rule `evaluate_transcoder`), each taking its config group typed.

Both go through `evaluate_dictionary` for a SAELens folder (an SAE or a single per-layer/skip
transcoder); `evaluate_transcoder` evaluates multi-layer stacks and CLTs as a whole.

The metric definitions and their steps are in `mechflow.dictionaries.metrics`; this module loads
the trained dictionary, streams its held-out shards, splices it into the model on held-out corpus
contexts and writes the metrics document. (Kept apart from `metrics` so that training, which
reports held-out metrics too, and evaluation both import `metrics` without an import cycle.)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import pyarrow.parquet as pq
import torch

from mechflow.contracts.dictionaries import DictionaryMetrics, DictionaryTraining, TranscoderStackMetrics
from mechflow.contracts.documents import load_document, write_document
from mechflow.dictionaries.config import EvalConfig, SAEConfig, TranscoderConfig, parse_config
from mechflow.dictionaries.data import ShardSource, load_manifest, manifest_path
from mechflow.dictionaries.metrics import (
    ce_metrics,
    reconstruction_metrics,
    sae_splice_hooks,
    stack_splice_hooks,
    transcoder_splice_hooks,
)
from mechflow.dictionaries.sae import TRAINING_SUMMARY, load_sae
from mechflow.dictionaries.transcoder import heldout_metrics, load_transcoder, read_transcoder_index, resolve_manifests
from mechflow.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def read_contexts(tokens: Path, context_ids: list[int], limit: int) -> torch.Tensor:
    """Up to `limit` contexts (in `context_ids` order) from the corpus `tokens.parquet`."""
    tokens = Path(tokens)
    if not tokens.exists():
        raise DataError(f"corpus tokens file {tokens} does not exist: re-run the corpus stage")
    table = pq.read_table(tokens, columns=["context_id", "tokens"])
    ids = table.column("context_id").to_numpy()
    index = {int(c): i for i, c in enumerate(ids)}
    rows = [index[c] for c in context_ids if c in index][:limit]
    if not rows:
        raise DataError(f"none of the held-out contexts {context_ids[:5]}... are in {tokens}: the corpus "
                        "and the harvest do not match; re-run harvest on this corpus")
    col = table.column("tokens").take(rows).to_pylist()
    if len({len(r) for r in col}) != 1:
        raise DataError(f"contexts in {tokens} have different lengths; the corpus stage writes fixed-length "
                        "contexts (tokens column)")
    return torch.tensor(col, dtype=torch.long)


def evaluate_sae(cfg: SAEConfig | Mapping[str, Any], *, dictionary: Path, manifest: Path, tokens: Path,
                 metrics: Path, model_cfg: dict | None = None, model: Any = None) -> dict[str, Any]:
    """Held-out metrics of the SAE `train_sae` wrote; write them to `metrics` (rule `evaluate_sae`).

    Args:
        cfg: the `sae` config group (its `eval` and `data.exclude_bos` settings are used).
        dictionary, manifest, tokens, metrics, model_cfg, model: as `evaluate_dictionary`.
    """
    return evaluate_dictionary(SAEConfig.from_dict(cfg), dictionary=dictionary, manifest=manifest, tokens=tokens,
                               metrics=metrics, model_cfg=model_cfg, model=model)


def evaluate_dictionary(cfg: EvalConfig | SAEConfig | TranscoderConfig | Mapping[str, Any], *, dictionary: Path,
                        manifest: Path, tokens: Path, metrics: Path, model_cfg: dict | None = None,
                        manifest_out: Path | None = None, model: Any = None) -> dict[str, Any]:
    """Held-out metrics of a trained SAE (or per-layer transcoder) folder; write them to `metrics`.

    Args:
        cfg: the `eval` settings, or a whole `sae`/`transcoder` group holding an `eval` key (typed or
            a mapping).
        dictionary: folder written by `train_sae` / `train_transcoder` (SAELens format).
        manifest: harvest manifest of the dictionary's input hook.
        tokens: corpus `tokens.parquet` the harvest ran on (for CE/KL).
        metrics: output JSON path.
        model_cfg: the `model` group, loaded with `mechflow.models.load_model_from_cfg`.
        manifest_out: for transcoders, the harvest manifest of the MLP-output hook.
        model: an already loaded HookedTransformer or HookedHF (tests); overrides `model_cfg`. The CE/KL
            splices need only TL-named forward hooks, so model.backend=hf serves (docs/models.md).
    """

    raw = cfg.model_dump() if hasattr(cfg, "model_dump") else (dict(cfg) if cfg is not None else {})
    is_group = any(k in raw for k in ("eval", "data", "d_sae", "architecture", "kind"))
    eval_cfg = parse_config(EvalConfig, raw.get("eval", {}) if is_group else raw, "eval")
    exclude_bos = bool((raw.get("data") or {}).get("exclude_bos", True)) if is_group else True
    dictionary = Path(dictionary)
    summary_path = dictionary / TRAINING_SUMMARY
    summary = load_document(summary_path, DictionaryTraining, fix="re-run the training stage", partial=True) \
        if summary_path.exists() else {}
    sae = load_sae(dictionary)
    sae.eval()
    man, _ = load_manifest(manifest)
    holdout = summary.get("holdout_shards") or [s.file for s in man.shards[-1:]]
    if not summary.get("holdout_shards"):
        log.warning("%s records no held-out shards; evaluating on the last shard of %s", dictionary, manifest)
    exclude_bos = bool(summary.get("exclude_bos", exclude_bos))
    is_transcoder = hasattr(sae.cfg, "d_out")
    if is_transcoder and manifest_out is None:
        raise ConfigError(f"{dictionary} is a transcoder: pass manifest_out (the MLP-output harvest)")
    if not is_transcoder and sae.cfg.d_in != man.d:
        raise ConfigError(f"dictionary {dictionary} has d_in={sae.cfg.d_in} but manifest {manifest} holds "
                          f"d={man.d} ({man.hook}); evaluate it on the harvest it was trained on")
    manifests = [manifest_path(manifest)] + ([manifest_path(manifest_out)] if is_transcoder else [])
    source = ShardSource(manifests, holdout, exclude_bos=exclude_bos)
    rec = reconstruction_metrics(sae, source, eval_cfg, d_in=man.d if is_transcoder else None)
    source.close()
    mean = rec.pop("_mean_target")
    result: dict[str, Any] = {"stage": "evaluate_dictionary", "dictionary": str(dictionary),
                              "architecture": sae.cfg.architecture(), "hook": man.hook,
                              "holdout_shards": holdout, "exclude_bos": source.exclude_bos, **rec}
    if eval_cfg.ce_contexts > 0:
        if model is None:
            from mechflow.models import load_model_from_cfg
            from mechflow.models.registry import ANY_BACKEND

            if not model_cfg:
                raise ConfigError("evaluate_dictionary needs model_cfg (the `model` group) for CE metrics, "
                                  "or set eval.ce_contexts: 0")
            model = load_model_from_cfg(model_cfg, stage="dictionaries", backends=ANY_BACKEND).model
        ctx_ids = sorted({c for s in man.shards if s.file in holdout
                          for c in range(s.first_context, s.last_context + 1)})
        tok = read_contexts(tokens, ctx_ids, eval_cfg.ce_contexts)
        start = 1 if source.exclude_bos else 0
        if is_transcoder:
            out_man, _ = load_manifest(manifest_out)
            hooks = transcoder_splice_hooks(sae, man.hook, out_man.hook, mean, start)
        else:
            hooks = sae_splice_hooks(sae, man.hook, mean, start)
        result.update(ce_metrics(model, tok, hooks, eval_cfg.ce_batch_size))
        result["ce_contexts"] = int(len(tok))
    write_document(metrics, DictionaryMetrics, result)
    log.info("dictionary %s: EV %.4f (with outliers %.4f), L0 %.1f, dead %.3f, CE recovered (zero) %s",
             dictionary, result["explained_variance"], result["explained_variance_with_outliers"], result["l0"],
             result["dead_fraction"], result.get("ce_recovered_zero"))
    return result


def evaluate_transcoder(cfg: TranscoderConfig | Mapping[str, Any], *, dictionary: Path, manifests: list[Path],
                        tokens: Path, metrics: Path, model_cfg: dict | None = None,
                        model: Any = None) -> dict[str, Any]:
    """Held-out metrics of any transcoder written by `train_transcoder`; write them to `metrics`.

    A single-layer per-layer or skip transcoder is a SAELens folder and goes through
    `evaluate_dictionary` (EV with outlier positions excluded and counted, FVU, L0, dead, CE). A
    multi-layer stack or a cross-layer transcoder is evaluated as a whole: FVU per output layer and
    overall, L0 per layer (and their sum, latents active per token), dead latents, and CE / KL with
    EVERY MLP of its layers replaced at once (`stack_splice_hooks`), against zero and mean ablation
    of the same MLP outputs.

    Args:
        cfg: the `transcoder` config group (typed; a mapping is validated into one).
        dictionary: the transcoder folder (`train_transcoder`'s ``out_dir``).
        manifests: harvest manifests of every layer's MLP input and output (any order).
        tokens, metrics, model_cfg, model: as `evaluate_dictionary`.
    """

    tcfg = parse_config(TranscoderConfig, cfg, "transcoder")
    dictionary = Path(dictionary)
    index = read_transcoder_index(dictionary)
    if index["kind"] != tcfg.kind or index["layers"] != tcfg.layers:
        raise ConfigError(f"transcoder.kind/layers = {tcfg.kind}/{tcfg.layers} but {dictionary} holds a "
                          f"{index['kind']} transcoder over layers {index['layers']}; re-run train_transcoder")
    in_paths, out_paths, in_hooks, out_hooks = resolve_manifests(tcfg, list(manifests))
    if index["kind"] != "clt" and len(index["layers"]) == 1:
        return evaluate_dictionary(cfg, dictionary=dictionary, manifest=in_paths[0], manifest_out=out_paths[0],
                                   tokens=tokens, metrics=metrics, model_cfg=model_cfg, model=model)

    summary = load_document(dictionary / TRAINING_SUMMARY, DictionaryTraining, fix="re-run train_transcoder",
                            partial=True)
    holdout = summary.get("holdout_shards")
    if not holdout:
        raise DataError(f"{dictionary / TRAINING_SUMMARY} records no held-out shards (transcoder.data."
                        "holdout_shards: 0); train with at least one to evaluate")
    stack = load_transcoder(dictionary)
    stack.eval()
    exclude_bos = bool(summary.get("exclude_bos", True))
    with torch.no_grad():
        rec = heldout_metrics(stack, ShardSource(in_paths + out_paths, holdout, exclude_bos=exclude_bos), tcfg)
    means = rec.pop("_mean_target")
    result: dict[str, Any] = {"stage": "evaluate_transcoder", "dictionary": str(dictionary), "kind": index["kind"],
                              "layers": index["layers"], "in_hooks": in_hooks, "out_hooks": out_hooks,
                              "holdout_shards": holdout, "exclude_bos": exclude_bos, **rec,
                              "l0": float(sum(rec["l0_per_layer"])),
                              "l0_definition": "latents active per token, summed over the stack's layers"}
    if tcfg.eval.ce_contexts > 0:
        if model is None:
            from mechflow.models import load_model_from_cfg
            from mechflow.models.registry import ANY_BACKEND

            if not model_cfg:
                raise ConfigError("evaluate_transcoder needs model_cfg (the `model` group) for CE metrics, "
                                  "or set transcoder.eval.ce_contexts: 0")
            model = load_model_from_cfg(model_cfg, stage="dictionaries", backends=ANY_BACKEND).model
        man, _ = load_manifest(in_paths[0])
        ctx_ids = sorted({c for s in man.shards if s.file in holdout
                          for c in range(s.first_context, s.last_context + 1)})
        tok = read_contexts(tokens, ctx_ids, tcfg.eval.ce_contexts)
        hooks = stack_splice_hooks(stack, in_hooks, out_hooks, means, 1 if exclude_bos else 0)
        result.update(ce_metrics(model, tok, hooks, tcfg.eval.ce_batch_size))
        result["ce_contexts"] = int(len(tok))
    write_document(metrics, TranscoderStackMetrics, result)
    log.info("transcoder %s (%s, layers %s): FVU %.4f, L0 %.1f, dead %.3f, CE increase %s", dictionary,
             index["kind"], index["layers"], result["fvu"], result["l0"], result["dead_fraction"],
             result.get("ce_increase"))
    return result
