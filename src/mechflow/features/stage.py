"""The `features` stage: what each latent of the run's SAE reads, what it writes, what it does for a task.

Steps of `features` (one SAELens folder written by `train_sae`), each in its own module:

1. **Stream the harvest** of the SAE's hook: per-latent top contexts, firing counts and
   histograms (`mechflow.features.stats`).
2. **Logit effects**: decoder directions through the final norm and W_U (`mechflow.features.logits`).
3. **Task attribution** with the SAE spliced in, and 4. **verification by exact ablation**
   (`mechflow.features.attribution`).
5. **Records** of the selected latents, their top-context windows decoded (`mechflow.features.records`).
6. `features.jsonl` (one `FeatureRecord` per latent), one self-contained `features.html`,
   `histograms.png` (`mechflow.features.render`), `task_attribution.parquet` (one row per task x
   latent, `TASK_ATTRIBUTION_SCHEMA`: attribution and its std over prompts, rank by |attribution|,
   clean and target activation summed over positions and averaged over prompts, verified,
   exact_effect) and `summary.json` (`FeatureSummary`: per task the metric of the model / spliced
   model / corrupted prompts, the agreement, the joint ablation of the verified latents), each
   written atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from mechflow.contracts.dictionaries import DictionaryTraining
from mechflow.contracts.documents import load_document, write_document
from mechflow.contracts.features import FeatureSummary
from mechflow.contracts.hooks import RESIDUAL_HOOK, hook_layer
from mechflow.contracts.parquet import TASK_ATTRIBUTION_SCHEMA, write_table
from mechflow.dictionaries.data import ShardSource, load_manifest, manifest_path
from mechflow.errors import ConfigError, DataError
from mechflow.features.attribution import SplicedSAE, analyse_task, check_sae
from mechflow.features.config import FeaturesConfig
from mechflow.features.logits import logit_effects
from mechflow.features.records import build_records, read_windows, select_features, token_decoder, write_feature_records
from mechflow.features.render import plot_histograms, render_html
from mechflow.features.stats import HIST_BINS_PER_DECADE, HIST_LOG10_HI, HIST_LOG10_LO, stream_feature_stats
from mechflow.io import atomic_write_text, sha256_file

log = logging.getLogger(__name__)


def load_dictionary(dictionary: Path) -> Any:
    """The SAE of a SAELens folder, in eval mode, checked to have one fixed decoder direction per latent."""
    from mechflow.dictionaries.sae import load_sae

    dictionary = Path(dictionary)
    if not (dictionary / "cfg.json").is_file():
        raise DataError(f"SAE folder {dictionary} does not exist or has no cfg.json: run the train_sae stage "
                        "(or point `dictionary` at a SAELens folder)")
    sae = load_sae(dictionary)
    sae.eval()
    check_sae(sae, dictionary)
    return sae


def _task_datasets(tasks: Sequence[str], datasets: Sequence[Path] | Path | None) -> dict[str, Path]:
    if datasets is None:
        datasets = []
    if isinstance(datasets, (str, Path)):
        datasets = [datasets]
    by_name = {Path(p).parent.name: Path(p) for p in datasets}
    unknown = [t for t in tasks if t not in by_name]
    if unknown:
        raise ConfigError(f"features.tasks: {unknown} are not tasks of this run (it has {sorted(by_name)}); "
                          "select them in `task` (e.g. task=[ioi,...]) or remove them from features.tasks")
    return {t: by_name[t] for t in tasks}


def write_task_attribution(frames: Sequence[pl.DataFrame], path: Path) -> None:
    """`task_attribution.parquet`: the tasks' frames, checked against `TASK_ATTRIBUTION_SCHEMA`."""
    frames = [f for f in frames if len(f)]
    table = pl.concat(frames) if frames else pl.from_arrow(TASK_ATTRIBUTION_SCHEMA.empty_table())
    write_table(table, path, TASK_ATTRIBUTION_SCHEMA)


def harvest_source(sae: Any, dictionary: Path, manifest: Path, tokens: Path) -> tuple[ShardSource, Any]:
    """The harvest rows the SAE was trained on (its hook, its BOS setting), checked against the SAE and
    the corpus; and the harvest manifest."""
    man, _ = load_manifest(manifest)
    mfile = manifest_path(manifest)
    if sae.cfg.d_in != man.d:
        raise ConfigError(f"SAE {dictionary} has d_in={sae.cfg.d_in} but harvest {mfile} holds d={man.d} "
                          f"({man.hook}): analyse it on the harvest it was trained on")
    hook_name = sae.cfg.metadata.hook_name
    if hook_name and hook_name != man.hook:
        raise ConfigError(f"SAE {dictionary} was trained on {hook_name!r} but harvest {mfile} holds {man.hook!r}; "
                          "set sae.hook to the SAE's hook")
    tokens = Path(tokens)
    if not tokens.exists():
        raise DataError(f"corpus tokens file {tokens} does not exist: re-run the prepare_corpus stage")
    if sha256_file(tokens) != man.corpus_sha256:
        raise DataError(f"{tokens} is not the corpus harvest {mfile} ran on (sha256 differs): re-run the harvest")
    training_file = Path(dictionary) / "training.json"
    training = (load_document(training_file, DictionaryTraining, fix="re-run train_sae", partial=True)
                if training_file.exists() else {})
    data = (training.get("config") or {}).get("data") or {}  # the SAE's `sae.data` settings, as trained
    source = ShardSource([mfile], exclude_bos=bool(training.get("exclude_bos", data.get("exclude_bos", True))),
                         verify_sha256=bool(data.get("verify_sha256", True)))
    return source, man


def _model_and_tokenizer(model: Any, tokenizer: Any, model_cfg: Mapping[str, Any] | None) -> tuple[Any, Any]:
    if model is None:
        from mechflow.models import load_model_from_cfg

        if not model_cfg:
            raise ConfigError("the features stage needs model_cfg (the `model` group) to load the model")
        loaded = load_model_from_cfg(dict(model_cfg))
        model = loaded.model
        tokenizer = loaded.tokenizer if tokenizer is None else tokenizer
    return model, tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)


def features(cfg: FeaturesConfig | Mapping[str, Any] | None, *, dictionary: Path, manifest: Path, tokens: Path,
             features: Path, html: Path, histograms: Path, attribution: Path, summary: Path,
             datasets: Sequence[Path] | None = None, model_cfg: Mapping[str, Any] | None = None, model: Any = None,
             tokenizer: Any = None) -> dict[str, Any]:
    """Stage function of rule `features` (steps 1-6 of the module docstring).

    Args:
        cfg: the `features` config group (a plain mapping is validated by `FeaturesConfig`).
        dictionary: the SAELens folder written by `train_sae`.
        manifest: harvest `_manifest.json` of the SAE's hook.
        tokens: the corpus `tokens.parquet` the harvest ran on.
        features, html, histograms, attribution, summary: output paths (JSONL, HTML, PNG, Parquet, JSON).
        datasets: `tasks/<task>/dataset.jsonl` of (at least) the tasks in `features.tasks`.
        model_cfg: the `model` group; `model` / `tokenizer`: already loaded ones (tests).
    """
    c = FeaturesConfig.from_dict(cfg)
    task_paths = _task_datasets(c.tasks, datasets)
    dictionary = Path(dictionary)
    sae = load_dictionary(dictionary)
    source, man = harvest_source(sae, dictionary, manifest, tokens)
    encode_dtype = sae.dtype
    stats = stream_feature_stats(lambda x: sae.encode(x.to(encode_dtype)), source, d_sae=sae.cfg.d_sae,
                                 k=c.top_contexts, batch_rows=c.batch_rows, max_tokens=c.max_tokens)
    source.close()
    log.info("feature stats over %d tokens: %d of %d latents fire", stats.n_tokens, int(stats.live.sum()),
             sae.cfg.d_sae)
    model, tokenizer = _model_and_tokenizer(model, tokenizer, model_cfg)
    spliced = SplicedSAE.build(model, sae, man.hook, 1 if source.exclude_bos else 0, c.error_term)

    task_results, task_frames = [], {}
    for name, path in task_paths.items():
        res, frame = analyse_task(spliced, name, path, c)
        task_results.append(res)
        task_frames[name] = frame
    always = [i for r in task_results for i in r.get("joint", {}).get("features", [])]
    chosen = select_features(stats, c, always)

    residual = bool(RESIDUAL_HOOK.search(man.hook)) and sae.cfg.d_in == model.cfg.d_model
    logit_fx = logit_effects(model, spliced.decoder, chosen, c.n_logits) if residual else None
    if not residual:
        log.warning("hook %s is not in the residual-stream basis of width d_model=%d: no logit effects",
                    man.hook, model.cfg.d_model)
    windows = read_windows(tokens, {cid for f in chosen for _, cid, _ in stats.top_contexts(f)})

    base = {"hook": man.hook, "layer": hook_layer(man.hook), "model": man.model,
            "architecture": sae.cfg.architecture(), "dictionary": str(dictionary)}
    records = build_records(stats, chosen, windows, c.window, token_decoder(tokenizer), logit_fx, task_frames, base)

    result = {"stage": "features", **base, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
              "config": c.to_dict(), "exclude_bos": source.exclude_bos, "n_tokens": stats.n_tokens,
              "n_live": int(stats.live.sum()), "n_dead": int((~stats.live).sum()),
              "dead_fraction": float((~stats.live).double().mean()), "n_records": len(records),
              "logit_effects": residual, "hist_log10_range": [HIST_LOG10_LO, HIST_LOG10_HI],
              "hist_bins_per_decade": HIST_BINS_PER_DECADE, "tasks": task_results}
    for t in task_results:
        for key in ("pearson", "spearman", "sign_agreement"):
            value = (t.get("agreement") or {}).get(key)
            if value is not None:
                result[f"{t['task']}_{key}"] = value

    write_task_attribution(list(task_frames.values()), attribution)
    plot_histograms(stats, always or chosen, Path(histograms),
                    f"{man.model} {man.hook}: {sae.cfg.architecture()} SAE, d_sae {sae.cfg.d_sae}")
    write_feature_records(records, Path(features))
    atomic_write_text(html, render_html(records, result, Path(histograms).read_bytes()))
    write_document(summary, FeatureSummary, result)
    log.info("features: %d records -> %s", len(records), features)
    return result
