"""The transcoder set: one per-layer JumpReLU transcoder for every MLP of the model (the replacement
model of the attribution-graph stage), trained one Snakemake job per layer.

Stages (rules):

- `harvest_layers` (one job per group of ``layers_per_harvest`` layers): one forward pass up to the
  group's last layer writes the MLP input and output of each of its layers, as the `harvest` stage
  writes any hook (`mechflow.harvest.harvest`); the folder is a ``temp()`` output, deleted once
  every layer of the group is trained, so disk stays bounded by the groups alive at once.
- `train_layer_transcoder` (one job per layer, wildcard ``{layer}``): `train_transcoder` on that
  layer's pair, held-out FVU / L0 / dead measured while the shards exist; the folder is SAELens'
  `jumprelu_transcoder` (or `jumprelu_skip_transcoder`) format.
- `transcoder_set`: the per-layer table and figure, the whole model with every MLP replaced at once
  (CE increase, CE recovered vs zero and mean ablation), and the set written in the layout
  circuit-tracer loads (`write_circuit_tracer_set`).
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mechflow.contracts.dictionaries import TranscoderSetDocument, TranscoderTraining
from mechflow.contracts.documents import load_document, write_document
from mechflow.dictionaries.config import TranscoderSetConfig, parse_config
from mechflow.dictionaries.sae import replace_dir
from mechflow.dictionaries.transcoder import (
    TRAINING_SUMMARY,
    JumpReLUTranscoderStack,
    load_transcoder,
    read_transcoder_index,
    train_transcoder,
)
from mechflow.errors import ConfigError, DataError
from mechflow.io import atomic_write_text
from mechflow.plotting import save_figure

log = logging.getLogger(__name__)

CIRCUIT_TRACER_CONFIG = "config.yaml"


def set_layers(cfg: TranscoderSetConfig, model_cfg: Mapping[str, Any]) -> list[int]:
    """The set's layers; ``layers: all`` needs the model's layer count before it is loaded."""
    from mechflow.models.config import ModelConfig

    n_layers = ModelConfig.from_dict(model_cfg).n_layers
    if n_layers is None:
        if cfg.layers == "all":
            raise ConfigError("transcoder_set.layers: all needs model.n_layers (the number of layers, known before "
                              "the model loads: one job per layer is planned from it); set it in "
                              "config/model/<name>.yaml")
        n_layers = max(cfg.layers) + 1
    return cfg.layer_list(n_layers)


def harvest_groups(cfg: TranscoderSetConfig | Mapping[str, Any], model_cfg: Mapping[str, Any]) -> list[list[int]]:
    cfg = parse_config(TranscoderSetConfig, cfg, "transcoder_set")
    layers = set_layers(cfg, model_cfg)
    k = cfg.layers_per_harvest
    return [layers[i:i + k] for i in range(0, len(layers), k)]


def group_of(cfg: TranscoderSetConfig | Mapping[str, Any], model_cfg: Mapping[str, Any], layer: int) -> int:
    for g, layers in enumerate(harvest_groups(cfg, model_cfg)):
        if layer in layers:
            return g
    raise ConfigError(f"layer {layer} is not in transcoder_set.layers")


def layer_hooks(cfg: TranscoderSetConfig, layer: int) -> tuple[str, str]:
    return cfg.in_hook.format(layer=layer), cfg.out_hook.format(layer=layer)


def harvest_layers(cfg: TranscoderSetConfig | Mapping[str, Any], *, harvest_cfg: Mapping[str, Any],
                   model_cfg: dict, tokens: Path, harvest_dir: Path, group: int | str) -> dict:
    """Harvest the MLP input and output of every layer of harvest group ``group`` into
    ``harvest_dir`` (its ``index.json`` and one folder per hook), with the `harvest` group's
    settings (batch size, shards, dtype) and ``transcoder_set.harvest_max_contexts``."""
    from mechflow.harvest import harvest

    tcfg = parse_config(TranscoderSetConfig, cfg, "transcoder_set")
    groups = harvest_groups(tcfg, model_cfg)
    group = int(group)
    if not 0 <= group < len(groups):
        raise ConfigError(f"harvest group {group} does not exist: transcoder_set has {len(groups)} groups")
    hooks = [h for layer in groups[group] for h in layer_hooks(tcfg, layer)]
    hcfg = {**dict(harvest_cfg), "layers": [], "hook_points": [], "hooks": hooks}
    if tcfg.harvest_max_contexts is not None:
        hcfg["max_contexts"] = tcfg.harvest_max_contexts
    harvest_dir = Path(harvest_dir)
    return harvest(hcfg, model_cfg=model_cfg, tokens=tokens, index=harvest_dir / "index.json",
                   harvest_dir=harvest_dir)


def train_layer_transcoder(cfg: TranscoderSetConfig | Mapping[str, Any], *, harvest_dir: Path, out_dir: Path,
                           layer: int | str, model_cfg: dict | None = None,
                           wandb_cfg: dict | None = None) -> dict[str, Any]:
    """Train layer ``layer``'s transcoder of the set (`train_transcoder` with ``layers: [layer]``)
    from the shards of its harvest group."""
    tcfg = parse_config(TranscoderSetConfig, cfg, "transcoder_set")
    layer = int(layer)
    manifests = [Path(harvest_dir) / hook / "_manifest.json" for hook in layer_hooks(tcfg, layer)]
    missing = [str(m) for m in manifests if not m.exists()]
    if missing:
        raise DataError(f"{missing} missing: harvest group folder {harvest_dir} does not hold layer {layer} "
                        "(re-run harvest_layers)")
    return train_transcoder(tcfg.for_layer(layer), manifests=manifests, out_dir=Path(out_dir),
                            model_cfg=model_cfg, wandb_cfg=wandb_cfg)


def load_set_stack(folders: list[Path]) -> tuple[JumpReLUTranscoderStack, list[int], list[str], list[str]]:
    """One per-layer (or skip) stack holding every layer's transcoder of the set, in layer order."""
    parts = []
    for folder in folders:
        index = read_transcoder_index(folder)
        if len(index["layers"]) != 1 or index["kind"] == "clt":
            raise DataError(f"{folder} is not a one-layer per-layer transcoder (kind {index['kind']}, layers "
                            f"{index['layers']}): re-run train_layer_transcoder")
        parts.append((index["layers"][0], index, load_transcoder(folder)))
    parts.sort(key=lambda p: p[0])
    first = parts[0][2]
    if len({(p[2].d_in, p[2].d_out, p[2].d_sae, p[2].kind) for p in parts}) != 1:
        raise DataError("the set's transcoders differ in width or kind: train them with one transcoder_set config")
    stack = JumpReLUTranscoderStack(len(parts), first.d_in, first.d_out, first.d_sae, first.kind,
                                    bandwidth=first.bandwidth)
    with torch.no_grad():
        for i, (_, _, tc) in enumerate(parts):
            for name in ("W_enc", "b_enc", "threshold", "b_dec", "W_dec_stack"):
                getattr(stack, name)[i].copy_(getattr(tc, name)[0])
            if stack.W_skip is not None:
                stack.W_skip[i].copy_(tc.W_skip[0])
    return (stack, [p[0] for p in parts], [p[1]["in_hooks"][0] for p in parts],
            [p[1]["out_hooks"][0] for p in parts])


def write_circuit_tracer_set(stack: JumpReLUTranscoderStack, layers: list[int], in_hooks: list[str],
                             out_hooks: list[str], out_dir: Path, model_name: str) -> Path:
    """The set in the layout circuit-tracer loads (`circuit_tracer.utils.hf_utils.load_transcoders`,
    ``model_kind: transcoder_set``): ``layer_{i}.safetensors`` with ``W_enc [d_sae, d_model]`` (its
    `F.linear` layout: ours transposed), ``W_dec [d_sae, d_model]``, ``b_enc``, ``b_dec``,
    ``activation_function.threshold`` and ``W_skip [d_model, d_model]`` for skip transcoders; and
    ``config.yaml`` naming the files and the feature hooks relative to a block
    (``ln2.hook_normalized`` / ``hook_mlp_out``: the same values with or without folded norms)."""
    import yaml
    from safetensors.torch import save_file

    if layers != list(range(len(layers))):
        raise ConfigError(f"circuit-tracer needs a transcoder for every layer from 0; the set has {layers}")
    relative = {h.split(".", 2)[2] for h in in_hooks}, {h.split(".", 2)[2] for h in out_hooks}
    if len(relative[0]) != 1 or len(relative[1]) != 1:
        raise DataError(f"the set's hooks {in_hooks[:2]}... / {out_hooks[:2]}... differ across layers")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    files = []
    for i in range(len(layers)):
        state = {"W_enc": stack.W_enc[i].T.contiguous(), "W_dec": stack.W_dec_stack[i].contiguous(),
                 "b_enc": stack.b_enc[i].contiguous(), "b_dec": stack.b_dec[i].contiguous(),
                 "activation_function.threshold": stack.threshold[i].contiguous()}
        if stack.W_skip is not None:
            state["W_skip"] = stack.W_skip[i].contiguous()
        save_file({k: v.detach().float() for k, v in state.items()}, str(tmp / f"layer_{i}.safetensors"))
        files.append(f"layer_{i}.safetensors")
    config = {"model_name": model_name, "model_kind": "transcoder_set",
              "feature_input_hook": relative[0].pop(), "feature_output_hook": relative[1].pop(),
              "transcoders": files}
    (tmp / CIRCUIT_TRACER_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    replace_dir(tmp, out_dir)
    return out_dir


def transcoder_set(cfg: TranscoderSetConfig | Mapping[str, Any], *, trainings: list[Path], tokens: Path,
                   summary: Path, table: Path, figure: Path, circuit_tracer: Path, model_cfg: dict,
                   harvest_cfg: Mapping[str, Any] | None = None, model: Any = None) -> dict[str, Any]:
    """Summarise the trained set: per-layer held-out metrics (from each layer's training.json), the
    whole model with every MLP replaced at once (CE on the last corpus contexts, which the held-out
    shards hold), and the circuit-tracer export."""
    from mechflow.dictionaries.evaluate import read_contexts
    from mechflow.dictionaries.metrics import ce_metrics, stack_splice_hooks

    tcfg = parse_config(TranscoderSetConfig, cfg, "transcoder_set")
    folders = [Path(t).parent for t in trainings]
    rows = []
    for folder in folders:
        doc = load_document(folder / TRAINING_SUMMARY, TranscoderTraining, fix="re-run train_layer_transcoder")
        held = doc.get("heldout") or {}
        if not held:
            raise DataError(f"{folder / TRAINING_SUMMARY} has no held-out metrics: train with "
                            "transcoder_set.data.holdout_shards >= 1")
        rows.append({"layer": doc["layers"][0], "fvu": held["fvu"], "l0": held["l0_per_layer"][0],
                     "dead_fraction": held["dead_fraction"], "heldout_tokens": held["n_tokens"],
                     "training_seconds": doc["seconds"], "training": str(folder / TRAINING_SUMMARY)})
    rows.sort(key=lambda r: r["layer"])
    stack, layers, in_hooks, out_hooks = load_set_stack(folders)
    if model is None:
        from mechflow.models import load_model_from_cfg
        from mechflow.models.registry import ANY_BACKEND

        model = load_model_from_cfg(model_cfg, stage="transcoder_set", backends=ANY_BACKEND).model  # hooks only
    whole: dict[str, Any] = {}
    if tcfg.eval.ce_contexts > 0:
        import pyarrow.parquet as pq

        ids = pq.read_table(tokens, columns=["context_id"]).column("context_id").to_pylist()
        n_ctx = tcfg.harvest_max_contexts or (harvest_cfg or {}).get("max_contexts") or len(ids)
        tok = read_contexts(tokens, ids[:n_ctx][-tcfg.eval.ce_contexts:], tcfg.eval.ce_contexts)
        start = 1 if tcfg.data.exclude_bos else 0
        with torch.no_grad():
            _, cache = model.run_with_cache(tok, names_filter=lambda n: n in set(out_hooks))
        means = torch.stack([cache[h][:, start:].reshape(-1, cache[h].shape[-1]).mean(0) for h in out_hooks])
        del cache
        stack.eval()
        whole = ce_metrics(model, tok, stack_splice_hooks(stack, in_hooks, out_hooks, means, start),
                           tcfg.eval.ce_batch_size)
        whole["ce_contexts"] = int(len(tok))
        whole["mean_source"] = "mean MLP output of each layer over the same contexts (positions >= start)"
    fvu = [r["fvu"] for r in rows]
    doc = {"stage": "transcoder_set", "kind": tcfg.kind, "layers": layers, "in_hooks": in_hooks,
           "out_hooks": out_hooks, "d_sae": tcfg.d_sae, "per_layer": rows,
           "mean_fvu": sum(fvu) / len(fvu), "max_fvu": max(fvu),
           "mean_l0": sum(r["l0"] for r in rows) / len(rows),
           "mean_dead_fraction": sum(r["dead_fraction"] for r in rows) / len(rows),
           "training_seconds": sum(r["training_seconds"] for r in rows),
           "whole_model": whole, "circuit_tracer": str(circuit_tracer),
           "folders": [str(f) for f in folders]}
    write_circuit_tracer_set(stack, layers, in_hooks, out_hooks, Path(circuit_tracer),
                             model.cfg.model_name)
    _write_table(rows, Path(table))
    _plot(rows, Path(figure), whole)
    write_document(summary, TranscoderSetDocument, doc)
    log.info("transcoder set (%d layers): mean FVU %.3f (max %.3f), mean L0 %.1f, dead %.3f, whole-model CE +%s",
             len(rows), doc["mean_fvu"], doc["max_fvu"], doc["mean_l0"], doc["mean_dead_fraction"],
             whole.get("ce_increase"))
    return doc


def _write_table(rows: list[dict], path: Path) -> None:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _plot(rows: list[dict], path: Path, whole: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, key, label in zip(axes, ("fvu", "l0", "dead_fraction"), ("held-out FVU", "L0", "dead fraction"),
                              strict=True):
        ax.bar(layers, [r[key] for r in rows], color="#4e79a7")
        ax.set_xlabel("layer")
        ax.set_title(label)
    if "ce_increase" in whole:
        fig.suptitle(f"every MLP replaced: CE +{whole['ce_increase']:.3f} nats, "
                     f"CE recovered vs mean ablation {whole['ce_recovered_mean']:.3f}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
