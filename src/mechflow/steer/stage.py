"""The `steer` stage: directions and features to intervene on, strength sweeps in the real model
with side effects, controls, generations and one record per intervention.

Steps of `steer` (one job per task of ``steer.tasks``), each in its own module:

1. **Split** the task's prompt pairs (seeded) into training and held-out halves; every effect is
   measured on held-out prompts only.
2. **Directions** (`mechflow.steer.directions`): at each layer the difference of mean residual
   activations, clean (positive) minus corrupted (negative) prompts (or the ``contrast_file``
   texts), its held-out separation and a logistic-regression probe; the layer of best separation
   is steered (the curve is ``layers.png``).
3. **Features**: the latents of the run's SAE (and single-layer transcoder) of largest |attribution|
   on the training prompts (`mechflow.steer.interventions.dictionary_attribution`: zero ablation,
   error term kept), plus the SAE / transcoder latents named in the config.
4. **Sweeps** (`mechflow.steer.measure`): every strength of every intervention applied with
   TransformerLens hooks; the target metric per held-out positive prompt, KL on held-out negative
   prompts, CE on corpus text, the other tasks' metrics. The weakest strength that reaches
   ``target_effect`` inside the side-effect bounds is chosen, or none, with the reason.
5. **Controls**: random directions of the contrast direction's norm and the shuffled-label
   direction (rescaled to that norm) at the chosen strength (else the weakest that reaches the
   target regardless of side effects, else the strongest); the percentile of the contrast effect
   among the random ones.
6. **Generations**: greedy continuations of a few held-out positives, unsteered and steered.
7. Files: ``summary.json`` (`SteerSummary`), ``interventions.jsonl`` (`InterventionRecord` per
   intervention x strength), ``activations.jsonl`` (`ActivationRecord`), ``directions.safetensors``
   (contrast and probe directions per layer), ``layers.png``, ``sweep.png``, ``generations.md``;
   each written atomically.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mechflow.contracts.documents import check_document, write_document
from mechflow.contracts.steer import ActivationRecord, InterventionRecord, SteerSummary
from mechflow.contracts.versions import SCHEMA_VERSION
from mechflow.errors import ConfigError, DataError
from mechflow.io import atomic_path, atomic_write_jsonl, atomic_write_text, canonical_hash, sha256_file
from mechflow.steer.config import SteerConfig
from mechflow.steer.directions import (
    random_directions,
    resid_hook,
    residual_activations,
    scan_layers,
    shuffled_direction,
)
from mechflow.steer.interventions import (
    Dictionary,
    Intervention,
    dictionary_attribution,
    sae_dictionary,
    top_attributed,
    transcoder_dictionary,
)
from mechflow.steer.measure import (
    PromptSet,
    baseline,
    choose,
    corpus_tokens,
    generate,
    percentile,
    reaches,
    score,
    side_effects,
    strongest,
    target_effect,
    weakest_reaching,
    within_bounds,
)
from mechflow.steer.plots import plot_layers, plot_sweeps
from mechflow.tasks.dataset import TaskDataset

log = logging.getLogger(__name__)

MIN_PROMPTS = 4  # two training and two held-out prompts per side at the least


def _datasets_by_task(datasets: Sequence[Path] | Path | None) -> dict[str, Path]:
    if datasets is None:
        return {}
    if isinstance(datasets, (str, Path)):
        datasets = [datasets]
    return {Path(p).parent.name: Path(p) for p in datasets}


def _folder_of(training: Sequence[Path] | Path | None) -> Path | None:
    """The dictionary folder of a (possibly empty) ``training.json`` input."""
    if isinstance(training, (str, Path)):
        training = [training]
    training = list(training or [])
    return Path(training[0]).parent if training else None


def split(items: list, heldout_fraction: float, seed: int) -> tuple[list, list]:
    """(training, held-out) items: a seeded permutation, the held-out share rounded, at least 2 each."""
    n = len(items)
    n_held = min(max(2, round(heldout_fraction * n)), n - 2)
    perm = np.random.default_rng(seed).permutation(n)
    held = sorted(perm[:n_held].tolist())
    train = sorted(perm[n_held:].tolist())
    return [items[i] for i in train], [items[i] for i in held]


def prompt_sets(ds: TaskDataset, path: Path, items: list) -> tuple[PromptSet, PromptSet]:
    sha = ds.meta["dataset_sha256"]
    return (PromptSet(ds.name, "positive", str(path), sha, ds.metric_kind, items),
            PromptSet(ds.name, "negative", str(path), sha, ds.metric_kind, items))


def _set_activations(model: Any, ps: PromptSet, layers: list[int], position: str, start: int,
                     max_batch: int) -> torch.Tensor:
    """``[L, n, d]`` residual activations of a prompt set, rows in `ps.items` order."""
    out = torch.zeros(len(layers), len(ps.items), model.cfg.d_model, dtype=torch.float64)
    for rows, batch in ps.batches(max_batch):
        tokens = batch.clean_tokens if ps.role == "positive" else batch.corrupted_tokens
        out[:, rows] = residual_activations(model, tokens, layers, position, start, max_batch)
    return out


def read_contrast_file(path: Path) -> tuple[list[str], list[str]]:
    """(positive texts, negative texts) of a JSONL of ``{"text": str, "label": "positive"|"negative"}``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"steer.contrast_file: {path} does not exist; give a JSONL of "
                          "{\"text\": ..., \"label\": \"positive\"|\"negative\"} lines, or null")
    pos, neg = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg}); each line is one "
                            "{\"text\", \"label\"} object") from exc
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip() \
                or row.get("label") not in ("positive", "negative"):
            raise DataError(f"{path}:{lineno}: needs a non-empty \"text\" string and \"label\" positive|negative")
        (pos if row["label"] == "positive" else neg).append(row["text"])
    if len(pos) < MIN_PROMPTS or len(neg) < MIN_PROMPTS:
        raise DataError(f"{path}: {len(pos)} positive and {len(neg)} negative texts; at least {MIN_PROMPTS} of "
                        "each are needed (half are held out)")
    return pos, neg


def _text_activations(model: Any, texts: list[str], layers: list[int], position: str, start: int,
                      tokenizer_meta: Mapping[str, Any]) -> torch.Tensor:
    """``[L, n, d]`` activations of the contrast file's texts, tokenized as the task's prompts were
    (the BOS convention of its ``dataset.meta.json``)."""
    from mechflow.models.registry import encode

    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ConfigError("steer.contrast_file: the model has no tokenizer to tokenize the texts; "
                          "leave steer.contrast_file null to use the task's prompt pairs")
    prepend, bos = bool(tokenizer_meta.get("prepend_bos", False)), tokenizer_meta.get("bos_token_id")
    rows = [residual_activations(model, torch.tensor([encode(tok, t, prepend, bos)]), layers, position, start)[:, 0]
            for t in texts]
    return torch.stack(rows, 1)


def bos_offset(model: Any, items: list) -> int:
    """1 when every prompt starts with the tokenizer's BOS (never steered), else 0."""
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    return int(bos is not None and all(it.clean_ids and it.clean_ids[0] == bos for it in items))


def _record(iv: Intervention, positive: PromptSet, tgt: dict, side: dict | None, ok: bool | None,
            failed: list[str], chosen: bool, head: dict, target: float, negative: PromptSet,
            tokens: Path | None, tokens_sha: str | None) -> dict:
    target_block = {"metric": positive.metric_kind, "prompts": positive.spec(), **tgt}
    if side is not None:
        side = {**side, "negative": {"prompts": negative.spec(), **side["negative"]},
                "corpus": ({"tokens": str(tokens), "tokens_sha256": tokens_sha, **side["corpus"]}
                           if side["corpus"] is not None else None)}
    rec = {"schema_version": SCHEMA_VERSION, **head, "intervention": iv.spec(), "target": target_block,
           "side_effects": side, "reached_target": reaches(tgt["normalized_effect"], target), "within_bounds": ok,
           "failed_bounds": failed, "chosen": chosen}
    return check_document(InterventionRecord, rec)


def sweep(model: Any, ivs: Sequence[Intervention], base: Any, held_pos: PromptSet, held_neg: PromptSet,
          c: SteerConfig) -> list[dict]:
    """Measure every intervention of one sweep: rows with the target block, side effects, bounds."""
    rows = []
    for iv in tqdm(ivs, desc=f"sweep {ivs[0].id}" if ivs else "sweep", leave=False):
        after = score(model, held_pos, iv, c.max_batch)
        tgt = target_effect(base, after)
        side = side_effects(model, iv, base, held_neg, c.max_batch).to_dict(base)
        ok, failed = within_bounds(side, c)
        rows.append({"iv": iv, "alpha": iv.alpha, "strength": iv.strength, "target": tgt,
                     "normalized_effect": tgt["normalized_effect"], "side": side, "within_bounds": ok,
                     "failed": failed})
    return rows


def _sweep_summary(ivs: Sequence[Intervention], rows: list[dict], chosen: dict | None, why: str, meta: dict) -> dict:
    first = ivs[0]
    return {"kind": first.kind, "id": first.id, "hook": first.hook, "operation": first.operation,
            "alphas": [r["alpha"] for r in rows], "normalized_effects": [r["normalized_effect"] for r in rows],
            "chosen_alpha": chosen["alpha"] if chosen else None, "why": why, "meta": meta}


@torch.no_grad()
def activation_records(d: Dictionary, feature: int, sets: Sequence[PromptSet], model: Any, decode: Any,
                       head: dict, max_batch: int) -> list[dict]:
    """The feature's unsteered activation at every position (after BOS) of every prompt of `sets`."""
    out = []
    for ps in sets:
        for rows, batch in ps.batches(max_batch):
            tokens = batch.clean_tokens if ps.role == "positive" else batch.corrupted_tokens
            _, cache = model.run_with_cache(tokens, names_filter=[d.hook_in])
            acts = d.encode(cache[d.hook_in][:, d.start:])[..., feature]
            for r, row in enumerate(rows):
                pid = ps.items[row].id
                for p in range(acts.shape[1]):
                    tok = int(tokens[r, d.start + p])
                    out.append(check_document(ActivationRecord, {
                        "schema_version": SCHEMA_VERSION, **head, "dictionary": d.path, "dictionary_kind": d.kind,
                        "hook": d.hook_in, "feature": feature, "role": ps.role, "dataset_sha256": ps.dataset_sha256,
                        "prompt_id": pid, "position": d.start + p, "token_id": tok, "token": decode(tok),
                        "activation": float(acts[r, p])}))
    return out


def write_directions(path: Path, scan: Any) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"contrast": scan.directions.float().contiguous(), "probe": scan.probes.float().contiguous(),
                   "layers": torch.tensor(scan.layers, dtype=torch.int64)}, str(tmp),
                  metadata={"hooks": json.dumps([resid_hook(la) for la in scan.layers]),
                            "chosen_layer": str(scan.layer)})


def _generations(model: Any, items: list, steers: Sequence[tuple[str, Intervention]], n: int, max_new: int,
                 task: str) -> str:
    lines = [f"# Generations, task {task}", "",
             "Greedy decoding (TransformerLens `generate`, KV cache), the same prompts unsteered and steered.", ""]
    tok = model.tokenizer
    for it in items[:n]:
        tokens = torch.tensor([it.clean_ids], dtype=torch.long)
        lines += [f"## prompt {it.id} (answer {it.answer!r}, foil {it.wrong_answer!r})", "",
                  f"    {it.prompt}", ""]
        for label, iv in (("unsteered", None), *steers):
            ids = generate(model, tokens, iv.hooks() if iv is not None else (), max_new)
            text = tok.decode(ids.tolist()) if tok is not None else str(ids.tolist())
            lines.append(f"- **{label}**: {text!r}")
        lines.append("")
    return "\n".join(lines)


def steer(cfg: SteerConfig | Mapping[str, Any] | None, *, dataset: Path, tokens: Path, summary: Path,
          interventions: Path, activations: Path, directions: Path, layers_figure: Path, sweep_figure: Path,
          generations: Path, datasets: Sequence[Path] | None = None, sae_training: Sequence[Path] | Path = (),
          transcoder_training: Sequence[Path] | Path = (), model_cfg: Mapping[str, Any] | None = None,
          model: Any = None, run: str = "") -> dict[str, Any]:
    """Stage function of rule `steer` (steps 1-7 of the module docstring).

    Args:
        cfg: the `steer` config group.
        dataset: the steered task's ``dataset.jsonl``; `datasets`: every task's (side effects).
        tokens: the corpus ``tokens.parquet`` (CE side effect).
        sae_training / transcoder_training: ``training.json`` of the run's SAE / transcoder folder (the
            folder is its parent; empty: no feature of that dictionary is steered).
        summary, interventions, activations, directions, layers_figure, sweep_figure, generations: outputs.
        model_cfg: the `model` group; `model`: an already loaded HookedTransformer (tests).
    """
    c = SteerConfig.from_dict(cfg)
    sae, transcoder = (_folder_of(p) for p in (sae_training, transcoder_training))
    dataset = Path(dataset)
    ds = TaskDataset.load(dataset)
    if not ds.posable or len(ds.examples) < MIN_PROMPTS:
        raise DataError(f"{dataset}: task {ds.name!r} has {len(ds.examples)} examples "
                        f"({ds.reason or 'too few'}); steering needs at least {MIN_PROMPTS} prompt pairs")
    if model is None:
        from mechflow.models import load_model_from_cfg

        if not model_cfg:
            raise ConfigError("the steer stage needs model_cfg (the `model` group) to load the model")
        model = load_model_from_cfg(dict(model_cfg)).model
    n_layers = model.cfg.n_layers
    layers = list(c.layers) if c.layers is not None else list(range(n_layers))
    bad = [la for la in layers + ([c.layer] if c.layer is not None else []) if not 0 <= la < n_layers]
    if bad:
        raise ConfigError(f"steer.layers / steer.layer: {bad} are not layers of {model.cfg.model_name} "
                          f"(0..{n_layers - 1})")
    if c.layer is not None and c.layer not in layers:
        layers = sorted({*layers, c.layer})
    config_hash = canonical_hash(c.to_dict())
    head = {"run": run, "model": model.cfg.model_name, "task": ds.name}
    position = "last" if c.position == "last" else "all"

    # 1. split
    train, held = split(ds.examples, c.heldout_fraction, c.seed)
    train_pos, train_neg = prompt_sets(ds, dataset, train)
    held_pos, held_neg = prompt_sets(ds, dataset, held)
    start = bos_offset(model, ds.examples)

    # 2. directions
    if c.contrast_file:
        pos_texts, neg_texts = read_contrast_file(Path(c.contrast_file))
        tp, hp = split(pos_texts, c.heldout_fraction, c.seed)
        tn, hn = split(neg_texts, c.heldout_fraction, c.seed + 1)
        acts = [_text_activations(model, t, layers, c.position, start, ds.meta.get("tokenizer") or {})
                for t in (tp, tn, hp, hn)]
        source = f"contrast file {c.contrast_file} (sha256 {sha256_file(c.contrast_file)})"
    else:
        acts = [_set_activations(model, ps, layers, c.position, start, c.max_batch)
                for ps in (train_pos, train_neg, held_pos, held_neg)]
        source = "task prompt pairs: clean (positive) - corrupted (negative)"
    scan = scan_layers(layers, *acts, l2=c.probe_l2, layer=c.layer)
    layer, d = scan.layer, scan.direction
    li = scan.chosen
    log.info("steer %s: layer %d (AUC %.3f, gap %s)", ds.name, layer, scan.rows[li]["auc"],
             "inf" if scan.rows[li]["separation"] is None else f"{scan.rows[li]['separation']:.2f}")

    # baselines
    by_task = _datasets_by_task(datasets)
    others = []
    for name, path in sorted(by_task.items()):
        if name == ds.name:
            continue
        other = TaskDataset.load(path)
        if other.posable and other.examples:
            clean, corrupted = prompt_sets(other, path, other.examples[:c.other_prompts])
            others.append((clean, corrupted))
    corpus = corpus_tokens(Path(tokens), c.corpus_contexts, c.corpus_tokens)
    tokens_sha = sha256_file(tokens)
    base = baseline(model, held_pos, held_neg, others, c.max_batch, corpus, c.corpus_batch)
    if base.gap == 0:
        raise DataError(f"{dataset}: the held-out clean and corrupted prompts have the same mean metric; "
                        "the normalised effect is undefined")

    records, summaries, plots, moved, notes = [], [], [], [], []

    def run_sweep(ivs: list[Intervention], meta: dict, label: str) -> tuple[list[dict], dict | None]:
        rows = sweep(model, ivs, base, held_pos, held_neg, c)
        chosen, why = choose(rows, c.target_effect)
        for r in rows:
            records.append(_record(r["iv"], held_pos, r["target"], r["side"], r["within_bounds"], r["failed"],
                                   r is chosen, head | {"config_hash": config_hash}, c.target_effect, held_neg,
                                   tokens, tokens_sha))
        summaries.append(_sweep_summary(ivs, rows, chosen, why, meta))
        pick = chosen or weakest_reaching(rows, c.target_effect) or strongest(rows, c.target_effect)
        if pick is not None:
            before, after = pick["target"]["accuracy_before"], pick["target"]["accuracy_after"]
            if (after < before) if c.target_effect < 0 else (after > before):
                moved.append(f"{ivs[0].id} at {pick['alpha']:g}: accuracy {before:.3g} -> {after:.3g} on "
                             f"{len(held_pos.items)} held-out prompts")
        plots.append({"label": label, "operation": ivs[0].operation, "alphas": [r["alpha"] for r in rows],
                      "effects": [r["normalized_effect"] for r in rows],
                      "kl": [r["side"]["negative"]["kl_mean"] for r in rows],
                      "ce": [r["side"]["corpus"]["ce_increase"] for r in rows],
                      "chosen": chosen["alpha"] if chosen else None})
        return rows, pick

    # 4. the contrast direction's sweep
    vec = d.to(model.cfg.dtype)
    contrast = Intervention("contrast", f"contrast:L{layer}", resid_hook(layer), position, "add", 0.0, layer, vec,
                            start=start)
    rows, pick = run_sweep([contrast.with_alpha(a) for a in c.alphas],
                           {"layer_auc": scan.rows[li]["auc"], "separation": scan.rows[li]["separation"]},
                           f"contrast L{layer}")
    steers = [(f"contrast L{layer}, alpha {pick['alpha']:g}", contrast.with_alpha(pick["alpha"]))] if pick else []

    # 5. controls at the chosen strength, else the weakest reaching the target, else the strongest
    controls = None
    if pick is not None:
        g = torch.Generator().manual_seed(c.seed)
        alpha = pick["alpha"]
        rand = random_directions(c.n_random, vec.shape[0], float(d.norm()), g)
        shuf = shuffled_direction(acts[0][li], acts[1][li], g)
        shuf_norm = float(shuf.norm())
        shuf = shuf / shuf.norm() * d.norm() if shuf_norm > 0 else shuf
        ctrl_effects = []
        for kind, j, v in [("random", j, v) for j, v in enumerate(rand)] + [("shuffled", 0, shuf)]:
            iv = Intervention(kind, f"{kind}:L{layer}:{j}", resid_hook(layer), position, "add", alpha, layer,
                              v.to(model.cfg.dtype), start=start)
            tgt = target_effect(base, score(model, held_pos, iv, c.max_batch))
            records.append(_record(iv, held_pos, tgt, None, None, [], False, head | {"config_hash": config_hash},
                                   c.target_effect, held_neg, None, None))
            ctrl_effects.append(tgt["normalized_effect"])
        random_effects = ctrl_effects[:-1]
        pct = percentile(pick["normalized_effect"], random_effects, c.target_effect) if random_effects else None
        controls = {"alpha": alpha, "effect": pick["normalized_effect"], "random_effects": random_effects,
                    "random_percentile": pct, "beats_random": bool(random_effects) and pct == 100.0,
                    "shuffled_effect": ctrl_effects[-1], "shuffled_norm": shuf_norm}

    # 3-4. dictionary features
    act_rows = []
    decode_tok = (lambda i: model.tokenizer.decode([i])) if getattr(model, "tokenizer", None) else str
    feature_sets: list[tuple[Dictionary, int, dict]] = []
    train_batches = [b for _, b in train_pos.batches(c.max_batch)]

    def latents(dct: Dictionary, n: int, named: Sequence[int], key: str) -> list[tuple[Dictionary, int, dict]]:
        """The `n` latents of largest |attribution| on the training prompts, then those named in `key`."""
        top = top_attributed(dictionary_attribution(model, dct, train_batches), n) if n else []
        chosen_by = "attribution (zero ablation, error term kept, training prompts)"
        return ([(dct, f, {"attribution": a, "chosen_by": chosen_by}) for f, a in top]
                + [(dct, f, {"chosen_by": f"config {key}"}) for f in named if f not in {f for f, _ in top}])

    if sae is not None and (c.n_features or c.sae_features):
        from mechflow.features.stage import load_dictionary

        dsae = sae_dictionary(load_dictionary(Path(sae)), Path(sae), model, start)
        feature_sets += latents(dsae, c.n_features, c.sae_features, "steer.sae_features")
    if c.transcoder_features and transcoder is None:
        raise ConfigError("steer.transcoder_features: this run has no transcoder folder; train one "
                          "(rule train_transcoder) or leave steer.transcoder_features empty")
    if transcoder is not None and (c.n_transcoder_features or c.transcoder_features):
        try:
            dtc = transcoder_dictionary(Path(transcoder), model, start)
        except ConfigError as exc:
            if c.transcoder_features:
                raise
            notes.append(f"no transcoder latent steered: {exc}")
        else:
            feature_sets += latents(dtc, c.n_transcoder_features, c.transcoder_features, "steer.transcoder_features")
    for dct, f, meta in feature_sets:
        if not 0 <= f < dct.d_sae:
            raise ConfigError(f"steer: feature {f} is not a latent of {dct.path} (d_sae {dct.d_sae})")
        kind = "sae_feature" if dct.kind == "sae" else "transcoder_feature"
        layer_of = int(dct.hook_out.split(".")[1]) if dct.hook_out.startswith("blocks.") else None
        grids = (("scale", c.feature_scales), ("set", c.feature_values))
        ivs = [Intervention(kind, f"{dct.kind}:{f}", dct.hook_out, c.feature_positions, op, float(a), layer_of, None,
                            dct, f, c.error_term, dct.start) for op, grid in grids for a in grid]
        if not ivs:
            continue
        _, fpick = run_sweep(ivs, meta, f"{dct.kind} latent {f}")
        if fpick is not None and not any(label.startswith(dct.kind) for label, _ in steers):
            steers.append((f"{dct.kind} latent {f}, {fpick['iv'].operation} {fpick['alpha']:g}", fpick["iv"]))
        act_rows += activation_records(dct, f, (held_pos, held_neg), model, decode_tok, head, c.max_batch)

    # 6. generations
    text = _generations(model, held, steers, c.n_generations, c.max_new_tokens, ds.name)

    result = {"schema_version": SCHEMA_VERSION, "stage": "steer", **head, "config": c.to_dict(),
              "config_hash": config_hash,
              "dataset": str(dataset), "dataset_sha256": ds.meta["dataset_sha256"], "direction_source": source,
              "n_train": len(train), "n_heldout": len(held), "position": c.position, "layers": scan.rows,
              "chosen_layer": layer, "gap": base.gap, "interventions": summaries, "controls": controls,
              "n_records": len(records), "n_activation_records": len(act_rows), "moved": moved,
              "notes": notes}
    check_document(SteerSummary, result)

    # 7. files
    plot_layers(scan.rows, layer, Path(layers_figure),
                f"{model.cfg.model_name}, {ds.name}: contrast direction per layer ({len(train)} training, "
                f"{len(held)} held-out pairs)")
    plot_sweeps(plots, controls, c.target_effect, Path(sweep_figure),
                f"{model.cfg.model_name}, {ds.name}: steering on {len(held)} held-out prompts")
    write_directions(Path(directions), scan)
    atomic_write_jsonl(interventions, records)  # each record checked by its contract when built
    atomic_write_jsonl(activations, act_rows)
    atomic_write_text(generations, text)
    write_document(summary, SteerSummary, result)
    log.info("steer %s: %d records, %d activation records -> %s", ds.name, len(records), len(act_rows), summary)
    return result
