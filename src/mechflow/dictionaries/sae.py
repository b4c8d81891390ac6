"""Train sparse autoencoders with SAELens' own `SAETrainer`, fed from Parquet activation shards.

Steps of `train_sae`:

1. Validate the config against the harvest manifest (hook, d_in) and split its shards into
   training and held-out shards (`data.holdout_shards`, by shard).
2. Build a SAELens training SAE for `architecture` (TopK: Gao et al. 2024; BatchTopK:
   Bussmann et al. 2024; JumpReLU: Rajamanoharan et al. 2024; standard L1: Bricken et al.
   2023; gated: Rajamanoharan et al. 2024a; Matryoshka: Bussmann et al. 2025).
3. Run `sae_lens.training.sae_trainer.SAETrainer.fit` on an `ActivationStream` over the
   training shards; training curves are recorded every `log_every` steps (SAELens' own
   `build_train_step_log_dict`) and sent to the stage's wandb run (offline/disabled per
   `WANDB_MODE`; SAELens' own wandb logger stays off so it never asks for a key).
   With `n_checkpoints > 0`, SAELens checkpoints (weights + trainer state) are written with
   the data-stream state; a rerun resumes from the latest one.
4. Save the inference SAE in SAELens' format (`cfg.json` + `sae_weights.safetensors`, loadable
   with `sae_lens.SAE.load_from_disk`), plus `sparsity.safetensors`, `training.json`
   (config, manifest sha256, shards, final metrics), `curves.csv` and `training_curves.png`,
   all into a temporary folder renamed onto `out_dir` at the end.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mechflow.contracts.dictionaries import SaeDataState, SaeTraining
from mechflow.contracts.documents import load_document, write_document
from mechflow.dictionaries.config import SAEConfig, parse_config
from mechflow.dictionaries.data import (
    ActivationStream,
    ShardSource,
    drop_outlier_rows,
    load_manifest,
    manifest_path,
    split_shards,
)
from mechflow.dictionaries.metrics import reconstruction_metrics
from mechflow.dictionaries.thresholds import quantile_thresholds, threshold_param_groups
from mechflow.errors import ConfigError, ModelLoadError
from mechflow.io import canonical_hash, sha256_file
from mechflow.plotting import save_figure

log = logging.getLogger(__name__)

TRAINING_SUMMARY = "training.json"
CURVES_CSV = "curves.csv"
CURVES_PNG = "training_curves.png"
DATA_STATE = "data_state.json"

_CURVE_KEYS = {
    "losses/overall_loss": "loss",
    "losses/mse_loss": "mse_loss",
    "metrics/l0": "l0",
    "metrics/explained_variance": "explained_variance",
    "sparsity/dead_features": "dead_features",
    "details/current_learning_rate": "lr",
}


def build_training_sae(cfg: SAEConfig, d_in: int, metadata: dict[str, Any] | None = None):
    """A fresh SAELens training SAE for `cfg.architecture` with input width `d_in`."""
    from sae_lens import saes

    common = dict(d_in=d_in, d_sae=cfg.d_sae, device=cfg.device, dtype="float32",
                  normalize_activations=cfg.normalize_activations, decoder_init_norm=cfg.decoder_init_norm)
    arch = cfg.architecture
    if arch == "topk":
        sae_cfg = saes.TopKTrainingSAEConfig(k=cfg.k, aux_loss_coefficient=cfg.aux_loss_coefficient, **common)
    elif arch == "batchtopk":
        sae_cfg = saes.BatchTopKTrainingSAEConfig(k=cfg.k, aux_loss_coefficient=cfg.aux_loss_coefficient, **common)
    elif arch == "matryoshka_batchtopk":
        widths = cfg.matryoshka_widths or [cfg.d_sae // 8, cfg.d_sae // 2, cfg.d_sae]
        if widths[-1] != cfg.d_sae or sorted(widths) != widths:
            raise ConfigError(f"sae.matryoshka_widths={widths} must increase and end at sae.d_sae={cfg.d_sae}")
        sae_cfg = saes.MatryoshkaBatchTopKTrainingSAEConfig(
            k=cfg.k, aux_loss_coefficient=cfg.aux_loss_coefficient, matryoshka_widths=widths, **common)
    elif arch == "jumprelu":
        sae_cfg = saes.JumpReLUTrainingSAEConfig(
            l0_coefficient=cfg.l0_coefficient, jumprelu_init_threshold=cfg.jumprelu_init_threshold,
            jumprelu_bandwidth=cfg.jumprelu_bandwidth, **common)
    elif arch == "standard":
        sae_cfg = saes.StandardTrainingSAEConfig(l1_coefficient=cfg.l1_coefficient,
                                                 l1_warm_up_steps=cfg.l1_warm_up_steps, **common)
    elif arch == "gated":
        sae_cfg = saes.GatedTrainingSAEConfig(l1_coefficient=cfg.l1_coefficient,
                                              l1_warm_up_steps=cfg.l1_warm_up_steps, **common)
    else:  # pydantic already restricts the values; kept for a clear error if the Literal grows
        raise ConfigError(f"sae.architecture={arch!r} is not supported")
    for key, value in (metadata or {}).items():
        sae_cfg.metadata[key] = value
    from sae_lens.registry import get_sae_training_class

    torch.manual_seed(cfg.seed)
    return get_sae_training_class(sae_cfg.architecture())[0](sae_cfg)


def _trainer_class():
    from sae_lens.training.sae_trainer import SAETrainer

    class CurveRecordingTrainer(SAETrainer):
        """SAELens' SAETrainer, recording its own per-step log dict every `log_every` steps.

        Only `step` is extended; the training loop, losses, optimiser, schedulers, dead-latent
        tracking and activation scaling are SAELens'.
        """

        def __init__(self, *args: Any, log_every: int, wandb_run: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.log_every = log_every
            self.wandb_run = wandb_run
            self.curves: list[dict[str, float]] = []
            self.last_log: dict[str, float] = {}

        def step(self, batch: torch.Tensor):
            out = super().step(batch)
            if (self.n_training_steps + 1) % self.log_every == 0 or \
                    self.n_training_samples >= self.cfg.total_training_samples:
                full = self.build_train_step_log_dict(out, n_training_samples=self.n_training_samples)
                point = {"step": self.n_training_steps + 1, "tokens": self.n_training_samples}
                for key, name in _CURVE_KEYS.items():
                    if key in full:
                        point[name] = float(full[key])
                point["dead_fraction"] = point.get("dead_features", 0.0) / self.sae.cfg.d_sae
                self.curves.append(point)
                self.last_log = point
                self.wandb_run.log(point, step=point["step"])
            return out

    return CurveRecordingTrainer


def give_thresholds_their_own_lr(trainer, scale: float) -> None:
    """Rebuild SAELens' Adam with the JumpReLU thresholds in a param group at lr x `scale`.

    SAETrainer builds one Adam over all parameters; the scheduler is rebuilt the same way
    (`get_lr_scheduler`), and its warm-up/decay factors apply to both groups. Called before
    any step or checkpoint load, so a resumed optimizer state has the same two groups.
    """
    from sae_lens.training.optim import get_lr_scheduler
    from torch.optim import Adam

    c = trainer.cfg
    groups = threshold_param_groups(trainer.sae.parameters(), trainer.sae.threshold, c.lr, scale)
    trainer.optimizer = Adam(groups, lr=c.lr, betas=(c.adam_beta1, c.adam_beta2))
    trainer.lr_scheduler = get_lr_scheduler(
        c.lr_scheduler_name, lr=c.lr, optimizer=trainer.optimizer, warm_up_steps=c.lr_warm_up_steps,
        decay_steps=c.lr_decay_steps, training_steps=c.total_training_steps, lr_end=c.lr_end,
        num_cycles=c.n_restart_cycles)


@torch.no_grad()
def _init_scaler_and_b_dec(trainer, cfg: SAEConfig, d_in: int) -> dict[str, float] | None:
    """Estimate SAELens' activation scale now (fit() then keeps it), start b_dec at the mean
    and, for JumpReLU with `jumprelu_target_l0`, the thresholds at the target L0.

    SAELens 6 starts b_dec at zero; residual streams have a large mean, so a short CPU
    budget would spend its first steps learning the offset (EV < 0 early on). Thresholds:
    see `mechflow.dictionaries.thresholds`. Returns the threshold-init record (or None).
    """
    if cfg.normalize_activations == "expected_average_only_in":
        trainer.activation_scaler.estimate_scaling_factor(d_in, trainer.data_provider, cfg.n_batches_for_norm_estimate)
    need_threshold = cfg.architecture == "jumprelu" and cfg.jumprelu_target_l0 is not None
    if cfg.b_dec_init != "mean" and not need_threshold:
        return None
    batches = torch.cat([trainer.activation_scaler(next(trainer.data_provider))
                         for _ in range(cfg.n_batches_for_norm_estimate)])
    if cfg.b_dec_init == "mean":
        trainer.sae.b_dec.data.copy_(batches.double().mean(0).to(trainer.sae.b_dec.dtype))
    if not need_threshold:
        return None
    _, pre = trainer.sae.encode_with_hidden_pre(batches.to(trainer.sae.W_enc.dtype))
    trainer.sae.threshold.data.copy_(quantile_thresholds(pre, cfg.jumprelu_target_l0, "sae.jumprelu_target_l0"))
    return {"target_l0": cfg.jumprelu_target_l0, "rows": len(batches),
            "l0_at_init": float((pre > trainer.sae.threshold).sum(-1).float().mean()),
            "threshold_median": float(trainer.sae.threshold.median())}


def plot_curves(curves: list[dict[str, float]], path: Path, title: str) -> None:
    """PNG of loss, L0, explained variance and dead fraction against training tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    x = [p["tokens"] for p in curves]
    for ax, key, label in zip(axes.flat, ["loss", "l0", "explained_variance", "dead_fraction"],
                              ["training loss", "L0 (active latents / token)", "explained variance (batch)",
                               "dead fraction"]):
        ax.plot(x, [p.get(key, float("nan")) for p in curves])
        ax.set_title(label)
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
    axes.flat[0].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def write_curves_csv(curves: list[dict[str, float]], path: Path) -> None:
    keys = sorted({k for p in curves for k in p}, key=lambda k: (k not in ("step", "tokens"), k))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(curves)


def _latest_checkpoint(folder: Path) -> Path | None:
    if not folder.exists():
        return None
    done = [p for p in folder.iterdir() if (p / DATA_STATE).exists() and p.name.isdigit()]
    return max(done, key=lambda p: int(p.name)) if done else None


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move a finished folder onto `out_dir` (replacing an old one) with renames only."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old.exists():
        shutil.rmtree(old)


def check_manifest_against_cfg(cfg: SAEConfig, manifest, manifest_path: Path, model_cfg: dict | None) -> int:
    if cfg.hook is not None and manifest.hook != cfg.hook:
        raise ConfigError(f"sae.hook={cfg.hook!r} but manifest {manifest_path} holds {manifest.hook!r}: "
                          "point the rule at the right harvest or set sae.hook to match (null accepts any)")
    if cfg.d_in is not None and cfg.d_in != manifest.d:
        raise ConfigError(f"sae.d_in={cfg.d_in} but manifest {manifest_path} holds vectors of width "
                          f"d={manifest.d} (hook {manifest.hook}); set sae.d_in: null or {manifest.d}")
    if model_cfg and model_cfg.get("name") and model_cfg["name"] != manifest.model:
        raise ConfigError(f"model.name={model_cfg['name']!r} but manifest {manifest_path} was harvested from "
                          f"{manifest.model!r}; train on that model's harvest")
    return manifest.d


def train_sae(cfg: SAEConfig | Mapping[str, Any], *, manifest: Path, out_dir: Path, model_cfg: dict | None = None,
              wandb_cfg: dict | None = None) -> dict[str, Any]:
    """Train one SAE on the activation shards of `manifest`; write a SAELens folder at `out_dir`.

    Args:
        cfg: the `sae` config group (dict / DictConfig / `SAEConfig`).
        manifest: the harvest `_manifest.json` (or its folder) of one (model, hook).
        out_dir: output folder (SAELens format + mechflow extras), replaced atomically.
        model_cfg: the `model` config group (checked against the manifest's model).
        wandb_cfg: the `wandb` config group (mode/project) for `mechflow.tracking.stage_run`.

    Returns:
        The training summary (also written to `out_dir/training.json`).
    """
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    from mechflow.tracking import stage_run

    cfg = parse_config(SAEConfig, cfg, "sae")
    manifest_obj, _ = load_manifest(manifest)
    manifest_file = manifest_path(manifest)
    d_in = check_manifest_against_cfg(cfg, manifest_obj, manifest_file, model_cfg)
    train_shards, holdout = split_shards(manifest_obj, cfg.data.holdout_shards, "sae.data.holdout_shards")
    manifest_sha = sha256_file(manifest_file)
    out_dir = Path(out_dir)
    ckpt_root = out_dir.with_name(f".{out_dir.name}.checkpoints")
    resume_from = _latest_checkpoint(ckpt_root)
    data_state = load_document(resume_from / DATA_STATE, SaeDataState, fix=f"delete {ckpt_root} to start afresh") \
        if resume_from else None
    # what is trained (not the bookkeeping): a checkpoint of another config must not be resumed
    config_key = canonical_hash(cfg.model_dump(mode="json", exclude={"n_checkpoints", "log_every", "eval"}))
    if data_state and (data_state.get("manifest_sha256"), data_state.get("config_hash")) != (manifest_sha, config_key):
        log.warning("checkpoints in %s were trained on another manifest or config; starting afresh", ckpt_root)
        shutil.rmtree(ckpt_root)
        resume_from, data_state = None, None

    source = ShardSource([manifest_file], [s.file for s in train_shards], exclude_bos=cfg.data.exclude_bos,
                         verify_sha256=cfg.data.verify_sha256)
    if cfg.data.drop_outliers is not None and cfg.data.clip_outliers is not None:
        raise ConfigError("sae.data.drop_outliers and sae.data.clip_outliers are exclusive: set one of them to null")
    drop_outlier_rows(source, cfg.data.clip_outliers or cfg.data.drop_outliers, clip=cfg.data.clip_outliers is not None)
    stream = ActivationStream(source, batch_size=cfg.data.batch_size, buffer_rows=cfg.data.buffer_rows,
                              chunk_rows=cfg.data.chunk_rows, seed=cfg.seed, prefetch=cfg.data.prefetch,
                              state=data_state["stream"] if data_state else None)
    metadata = {"model_name": manifest_obj.model, "hook_name": manifest_obj.hook,
                "context_size": manifest_obj.context_size, "prepend_bos": manifest_obj.prepend_bos,
                "mechflow_manifest_sha256": manifest_sha, "mechflow_exclude_bos": source.exclude_bos}
    sae = build_training_sae(cfg, d_in, metadata)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.training_tokens, train_batch_size_samples=cfg.data.batch_size, lr=cfg.lr,
        lr_end=cfg.lr_end if cfg.lr_end is not None else cfg.lr / 10, lr_scheduler_name=cfg.lr_scheduler_name,
        lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_decay_steps=cfg.lr_decay_steps, adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2,
        device=cfg.device, dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=cfg.feature_sampling_window, n_checkpoints=cfg.n_checkpoints,
        checkpoint_path=str(ckpt_root) if cfg.n_checkpoints else None, save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=cfg.n_batches_for_norm_estimate)
    if trainer_cfg.total_training_steps < 1:
        raise ConfigError(f"sae.training_tokens={cfg.training_tokens} is less than one batch "
                          f"(sae.data.batch_size={cfg.data.batch_size}); raise training_tokens")

    def save_stream_state(checkpoint_path: Path | None) -> None:
        if checkpoint_path is not None:  # written last: marks the checkpoint complete
            write_document(checkpoint_path / DATA_STATE, SaeDataState, {"stream": stream.state_dict(),
                                                                         "manifest_sha256": manifest_sha,
                                                                         "config_hash": config_key})

    config_dump = cfg.model_dump(mode="json")
    t0 = time.perf_counter()
    with stage_run("train_sae", config_dump, out_dir.parent, wandb_cfg, name=out_dir.name) as run:
        trainer = _trainer_class()(trainer_cfg, sae, stream, save_checkpoint_fn=save_stream_state,
                                   log_every=cfg.log_every, wandb_run=run)
        if cfg.architecture == "jumprelu" and cfg.jumprelu_threshold_lr_scale != 1.0:
            give_thresholds_their_own_lr(trainer, cfg.jumprelu_threshold_lr_scale)
        if resume_from is not None:
            log.info("resuming SAE training from %s", resume_from)
            sae.load_weights_from_checkpoint(resume_from)
            trainer.load_trainer_state(resume_from)
            trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds
                                             if t > trainer.n_training_samples]
            prev = resume_from / CURVES_CSV
            if prev.exists():
                with open(prev) as fh:
                    trainer.curves = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]

        orig_save = trainer.save_trainer_state

        def save_trainer_state_and_curves(path: Path) -> None:
            orig_save(path)
            write_curves_csv(trainer.curves, path / CURVES_CSV)

        trainer.save_trainer_state = save_trainer_state_and_curves  # curves survive a resume too
        threshold_init = None
        if resume_from is None:
            threshold_init = _init_scaler_and_b_dec(trainer, cfg, d_in)
        trainer.fit()
        stream.close()
        seconds = time.perf_counter() - t0
        tokens_done = trainer.n_training_samples

        sae.eval()
        heldout = None
        if holdout:
            hsrc = ShardSource([manifest_file], [s.file for s in holdout], exclude_bos=cfg.data.exclude_bos,
                               verify_sha256=cfg.data.verify_sha256)
            heldout = reconstruction_metrics(sae, hsrc, cfg.eval)
            heldout.pop("_mean_target")
            hsrc.close()
            run.log({f"heldout/{k}": v for k, v in heldout.items() if isinstance(v, (int, float))})

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    sae.save_inference_model(tmp)
    from sae_lens.constants import SPARSITY_FILENAME
    from safetensors.torch import save_file

    save_file({"sparsity": trainer.log_feature_sparsity.contiguous()}, tmp / SPARSITY_FILENAME)
    summary = {
        "stage": "train_sae", "config": config_dump, "model": manifest_obj.model, "hook": manifest_obj.hook,
        "d_in": d_in, "architecture": cfg.architecture, "manifest": str(manifest_file),
        "manifest_sha256": manifest_sha, "train_shards": [s.file for s in train_shards],
        "holdout_shards": [s.file for s in holdout], "exclude_bos": source.exclude_bos,
        "outlier_filter": source.outlier_summary(), "threshold_init": threshold_init,
        "training_tokens": tokens_done, "training_steps": trainer.n_training_steps,
        "seconds": round(seconds, 3), "tokens_per_second": round(tokens_done / max(seconds, 1e-9), 1),
        "final_train": trainer.last_log,
        "sae_lens_metadata": {"l0": sae.cfg.metadata.l0, "num_dead_features": sae.cfg.metadata.num_dead_features},
        "heldout": heldout, "data_state": stream.state_dict(),
        "resumed_from": str(resume_from) if resume_from else None,
    }
    write_document(tmp / TRAINING_SUMMARY, SaeTraining, summary)
    write_curves_csv(trainer.curves, tmp / CURVES_CSV)
    plot_curves(trainer.curves, tmp / CURVES_PNG, f"{cfg.architecture} SAE, {manifest_obj.model} {manifest_obj.hook}")
    replace_dir(tmp, out_dir)
    if ckpt_root.exists():
        shutil.rmtree(ckpt_root)
    log.info("trained %s SAE on %d tokens in %.1f s -> %s", cfg.architecture, tokens_done, seconds, out_dir)
    return summary


def load_sae(path: str | Path, device: str = "cpu"):
    """Load a dictionary folder written by `train_sae` (SAELens `SAE.load_from_disk`)."""
    from sae_lens import SAE

    return SAE.load_from_disk(path, device=device)


def load_pretrained_sae(release: str, sae_id: str, device: str = "cpu"):
    """Load a public SAE by SAELens release and id (needs the Hugging Face hub).

    Raises:
        ConfigError: `release` or `sae_id` is not in SAELens' pretrained directory.
        ModelLoadError: the hub cannot be reached (offline mode or no network).
    """
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        close = [r for r in directory if release.split("-")[0] in r][:5]
        raise ConfigError(f"SAE release {release!r} is not in SAELens' pretrained directory "
                          f"(similar: {close}); see sae_lens/pretrained_saes.yaml")
    if sae_id not in directory[release].saes_map:
        raise ConfigError(f"sae_id {sae_id!r} is not in release {release!r} "
                          f"(e.g. {list(directory[release].saes_map)[:5]})")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline:
        raise ModelLoadError(f"cannot download SAE {release}/{sae_id} from {directory[release].repo_id}: "
                             "HF_HUB_OFFLINE is set. Run online (unset HF_HUB_OFFLINE) to fetch it once into "
                             "the Hugging Face cache, or train a local SAE with the train_sae stage")
    try:
        return SAE.from_pretrained(release, sae_id, device=device)
    except Exception as exc:  # network/hub errors come in many types; all mean "not reachable here"
        raise ModelLoadError(f"cannot download SAE {release}/{sae_id} from {directory[release].repo_id} "
                             f"({type(exc).__name__}: {exc}); check the network or train a local SAE "
                             "with the train_sae stage") from exc
