"""Per-layer, skip and cross-layer JumpReLU transcoders trained from Parquet activation shards.

A transcoder reads an MLP's input (`blocks.{l}.ln2.hook_normalized`) and predicts the MLP's
output (`blocks.{l}.hook_mlp_out`) through sparse latents (Dunefsky et al. 2024). A skip
transcoder adds a linear term W_skip x (Paulo et al. 2025). A cross-layer transcoder (CLT;
Ameisen et al. 2025, "Circuit tracing") has one encoder per layer, and the latents read at
layer l write to the MLP outputs of every layer l..L-1 of the span:

    a_l      = JumpReLU_theta_l(W_enc[l] x_l + b_enc[l])
    y_hat_m  = sum_{l <= m} a_l W_dec[l][:, m - l] + b_dec[m]      (CLT)
    y_hat_l  = a_l W_dec[l] + b_dec[l] (+ x_l W_skip[l]^T)          (per-layer / skip)

Training steps (`train_transcoder`):

1. Stream aligned rows [x_0 .. x_{L-1} | y_0 .. y_{L-1}] from the harvest manifests of the
   in/out hooks of every layer (`ActivationStream`, shuffled across shards, resumable).
2. Estimate per-hook scale factors sqrt(d) / E||v|| from a few batches and train on scaled
   vectors (as SAELens' `expected_average_only_in`); the scales are folded into the saved
   weights, so saved transcoders take and return raw activations.
3. Minimise sum_l ||y_l - y_hat_l||^2 + lambda(t) * S + mu * P with Adam, where S is the
   sparsity penalty — `tanh`: sum tanh(c a ||W_dec||) (Anthropic) or `step`: the L0 through the
   threshold STE (Rajamanoharan et al. 2024) — and P Anthropic's pre-activation loss on dead
   latents. With `target_l0`, thresholds start at the per-latent pre-activation quantile that
   gives that L0 (`mechflow.dictionaries.thresholds`), and `threshold_lr_scale` gives the
   thresholds their own learning rate. With the L0 controller (`l0_control_kp`, `l0_control_ki`)
   the sparsity coefficient is a controlled quantity (written here: neither SAELens nor
   circuit-tracer trains a JumpReLU to a target L0): after the warm-up, with e_t = log(L0_ema /
   target_l0) — L0_ema a moving average (0.9) of the batches' L0, averaged over the stack's
   layers — the coefficient is the configured one times exp(kp e_t + ki sum_s<=t e_s), the
   proportional factor clamped to [1/10, 10] and the whole to [1e-3, 1e3]. The proportional term
   answers at once (and lets go as soon as L0 crosses the target: thresholds lag the coefficient,
   so a pure integral controller overshoots: 117 -> 41 for a target of 60 at layer 20); the
   integral term removes the offset. One recipe then gives every layer about the same L0, where a
   fixed coefficient gives 43 at one layer and 117 at another (docs/graphs.md).
   The JumpReLU is SAELens' autograd function (`sae_lens.saes.jumprelu_sae.JumpReLU`
   and `Step`): exact forward, and for the threshold the straight-through estimator
   d/dtheta JumpReLU(z) = -(theta / eps) K((z - theta) / eps) with the rectangle kernel K.

Why the loop is written here: SAELens (6.x) ships inference classes for transcoders
(`JumpReLUTranscoder`, `JumpReLUSkipTranscoder`) but no transcoder training (its
`SAETrainer` reconstructs its own input), and it has no cross-layer transcoder at all.

Saved format (`out_dir`):
- per_layer / skip: one SAELens folder per layer, `layer_{l}/` (`cfg.json` with architecture
  `jumprelu_transcoder` / `jumprelu_skip_transcoder`, `sae_weights.safetensors` with
  W_enc [d_in, d_sae], b_enc, threshold [d_sae], W_dec [d_sae, d_out], b_dec [d_out],
  W_skip [d_out, d_in]); each loads with `sae_lens.SAE.load_from_disk`. With one layer, that
  folder's files are also at the top level, so `out_dir` itself is SAELens-loadable.
- clt: `clt_cfg.json` ({"architecture": "jumprelu_clt", "layers", "d_in", "d_out", "d_sae",
  "in_hooks", "out_hooks", ...}) and `clt_weights.safetensors` with W_enc [L, d_in, d_sae],
  b_enc [L, d_sae], threshold [L, d_sae], b_dec [L, d_out], and W_dec_{i} [d_sae, L - i, d_out]
  for the i-th layer of the span (the circuit-tracer layout). `load_transcoder` reads both.
- always: `transcoder.json` (index: kind, layers, hooks, files), `training.json`,
  `curves.csv`, `training_curves.png`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mechflow.contracts.dictionaries import CltConfig, TranscoderIndex, TranscoderTraining
from mechflow.contracts.documents import check_document, load_document, write_document
from mechflow.dictionaries.config import TranscoderConfig, parse_config
from mechflow.dictionaries.data import (
    ActivationStream,
    ShardSource,
    drop_outlier_rows,
    load_manifest,
    manifest_path,
    split_shards,
)
from mechflow.dictionaries.sae import (
    CURVES_CSV,
    CURVES_PNG,
    TRAINING_SUMMARY,
    plot_curves,
    replace_dir,
    write_curves_csv,
)
from mechflow.dictionaries.thresholds import quantile_thresholds, threshold_param_groups
from mechflow.errors import ConfigError, DataError
from mechflow.io import sha256_file

log = logging.getLogger(__name__)

CLT_CFG = "clt_cfg.json"
CLT_WEIGHTS = "clt_weights.safetensors"
TRANSCODER_INDEX = "transcoder.json"


class JumpReLUTranscoderStack(nn.Module):
    """`n_layers` transcoders (per-layer, skip) or one cross-layer transcoder over them.

    Inputs and outputs are ``[batch, n_layers, d]``.
    """

    def __init__(self, n_layers: int, d_in: int, d_out: int, d_sae: int, kind: str = "per_layer",
                 init_threshold: float = 0.05, bandwidth: float = 0.05, seed: int = 0):
        super().__init__()
        self.n_layers, self.d_in, self.d_out, self.d_sae, self.kind = n_layers, d_in, d_out, d_sae, kind
        self.bandwidth = bandwidth
        g = torch.Generator().manual_seed(seed)
        # Anthropic's CLT init: W_enc ~ U(±1/sqrt(d_sae)), W_dec ~ U(±1/sqrt(L d_out)).
        enc_bound = 1 / math.sqrt(d_sae)
        self.W_enc = nn.Parameter((torch.rand(n_layers, d_in, d_sae, generator=g) * 2 - 1) * enc_bound)
        self.b_enc = nn.Parameter(torch.zeros(n_layers, d_sae))
        self.threshold = nn.Parameter(torch.full((n_layers, d_sae), float(init_threshold)))
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_out))
        if kind == "clt":
            dec_bound = 1 / math.sqrt(n_layers * d_out)
            self.W_dec = nn.ParameterList([
                nn.Parameter((torch.rand(d_sae, n_layers - i, d_out, generator=g) * 2 - 1) * dec_bound)
                for i in range(n_layers)])
        else:
            dec_bound = 1 / math.sqrt(d_out)
            self.W_dec_stack = nn.Parameter((torch.rand(n_layers, d_sae, d_out, generator=g) * 2 - 1) * dec_bound)
        self.W_skip = nn.Parameter(torch.zeros(n_layers, d_out, d_in)) if kind == "skip" else None

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bli,lis->bls", x, self.W_enc) + self.b_enc

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, pre-activations), both ``[batch, n_layers, d_sae]``."""
        from sae_lens.saes.jumprelu_sae import JumpReLU

        pre = self.pre_acts(x)
        acts = JumpReLU.apply(pre, self.threshold.to(pre.dtype), self.bandwidth, False)
        return acts, pre

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "clt":
            out = self.b_dec.expand(acts.shape[0], -1, -1).clone()
            for i, W in enumerate(self.W_dec):  # latents of layer i write to layers i..L-1
                out[:, i:] = out[:, i:] + torch.einsum("bs,smo->bmo", acts[:, i], W)
            return out
        out = torch.einsum("bls,lso->blo", acts, self.W_dec_stack) + self.b_dec
        if self.W_skip is not None:
            assert x is not None
            out = out + torch.einsum("bli,loi->blo", x, self.W_skip)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts, _ = self.encode(x)
        return self.decode(acts, x)

    def encode_layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Latents ``[N, d_sae]`` of layer ``i`` from its own input ``[N, d_in]`` (as `encode`)."""
        from sae_lens.saes.jumprelu_sae import JumpReLU

        pre = x @ self.W_enc[i] + self.b_enc[i]
        return JumpReLU.apply(pre, self.threshold[i].to(pre.dtype), self.bandwidth, False)

    def decode_layer(self, i: int, acts: dict[int, torch.Tensor], x: torch.Tensor | None = None) -> torch.Tensor:
        """Output ``[N, d_out]`` of layer ``i`` (as `decode`) from the latents of layers ``<= i``
        (a CLT's layer i reads every earlier layer's latents; the others only their own)."""
        if self.kind == "clt":
            out = self.b_dec[i].expand(acts[i].shape[0], -1)
            for j in range(i + 1):
                out = out + acts[j] @ self.W_dec[j][:, i - j]
            return out
        out = acts[i] @ self.W_dec_stack[i] + self.b_dec[i]
        if self.W_skip is not None:
            assert x is not None
            out = out + x @ self.W_skip[i].T
        return out

    def decoder_norms(self) -> torch.Tensor:
        """``[n_layers, d_sae]``: norm of each latent's full output (all layers it writes to)."""
        if self.kind == "clt":
            return torch.stack([W.pow(2).sum((1, 2)).sqrt() for W in self.W_dec])
        return self.W_dec_stack.norm(dim=-1)

    @torch.no_grad()
    def fold_scales(self, in_scale: torch.Tensor, out_scale: torch.Tensor) -> None:
        """Absorb input scaling x -> s_in x and output scaling y -> s_out y into the weights."""
        self.W_enc.mul_(in_scale[:, None, None])
        self.b_dec.div_(out_scale[:, None])
        if self.kind == "clt":
            for i, W in enumerate(self.W_dec):
                W.div_(out_scale[i:][None, :, None])
        else:
            self.W_dec_stack.div_(out_scale[:, None, None])
        if self.W_skip is not None:
            self.W_skip.mul_((in_scale / out_scale)[:, None, None])


def sparsity_loss(model: JumpReLUTranscoderStack, acts: torch.Tensor, pre: torch.Tensor, mode: str,
                  tanh_scale: float) -> torch.Tensor:
    """Per-example sparsity penalty, summed over layers and latents, averaged over the batch."""
    norms = model.decoder_norms()
    if mode == "tanh":
        return torch.tanh(tanh_scale * acts * norms).sum((1, 2)).mean()
    from sae_lens.saes.jumprelu_sae import Step

    return Step.apply(pre, model.threshold.to(pre.dtype), model.bandwidth, False).sum((1, 2)).mean()


def pre_act_loss(model: JumpReLUTranscoderStack, pre: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """Anthropic's pre-activation loss on dead latents: pushes their pre-activations up to theta."""
    if not dead.any():
        return pre.new_zeros(())
    return ((model.threshold - pre).relu() * dead * model.decoder_norms()).sum((1, 2)).mean()


def _fvu(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    err = (y - y_hat).pow(2).sum()
    var = (y - y.mean(0)).pow(2).sum()
    return float(err / var)


def train_stack(model: JumpReLUTranscoderStack, stream, cfg: TranscoderConfig, n_steps: int,
                wandb_run: Any = None) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Train `model` in place on batches of `stream` (rows [x | y] flattened); return curves."""
    L, d_in, d_out = model.n_layers, model.d_in, model.d_out
    split = L * d_in

    def unpack(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return batch[:, :split].reshape(-1, L, d_in), batch[:, split:].reshape(-1, L, d_out)

    with torch.no_grad():  # scale factors sqrt(d) / E||v|| per hook (SAELens' expected_average_only_in)
        xs, ys = zip(*(unpack(next(stream)) for _ in range(cfg.n_batches_for_norm_estimate)))
        in_scale = math.sqrt(d_in) / torch.cat(xs).norm(dim=-1).mean(0)
        out_scale = math.sqrt(d_out) / torch.cat(ys).norm(dim=-1).mean(0)
        # b_dec starts at the (scaled) output mean, so early steps fit directions, not offsets.
        model.b_dec.copy_((torch.cat(ys) * out_scale[None, :, None]).mean(0))
        threshold_init = None
        if cfg.target_l0 is not None:  # see mechflow.dictionaries.thresholds
            pre = model.pre_acts(torch.cat(xs) * in_scale[None, :, None])
            model.threshold.copy_(quantile_thresholds(pre, cfg.target_l0, "transcoder.target_l0"))
            threshold_init = {"target_l0": cfg.target_l0, "rows": len(pre),
                              "l0_at_init_per_layer": (pre > model.threshold).sum(-1).float().mean(0).tolist()}
    opt = torch.optim.Adam(threshold_param_groups(model.parameters(), model.threshold, cfg.lr, cfg.threshold_lr_scale),
                           lr=cfg.lr, betas=(0.9, 0.999))
    decay_start = int(n_steps * (1 - cfg.lr_decay_fraction))

    def lr_lambda(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.lr_warm_up_steps) if cfg.lr_warm_up_steps else 1.0
        decay = 1.0 if step < decay_start else max(0.0, (n_steps - step) / max(1, n_steps - decay_start))
        return warm * decay

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    since_fired = torch.zeros(L, model.d_sae)
    dead_window = max(1, cfg.eval.dead_min_tokens // cfg.data.batch_size)
    curves: list[dict[str, float]] = []
    last: dict[str, float] = {}
    control = 1.0  # the L0 controller's multiplier of sparsity_coefficient (1 without a controller)
    l0_ema: float | None = None
    error_sum = 0.0
    for step in tqdm(range(n_steps), desc=f"training {cfg.kind} transcoder", mininterval=5):
        x, y = unpack(next(stream))
        x, y = x * in_scale[None, :, None], y * out_scale[None, :, None]
        acts, pre = model.encode(x)
        y_hat = model.decode(acts, x)
        mse = (y - y_hat).pow(2).sum((1, 2)).mean()
        coeff = control * cfg.sparsity_coefficient * (min(1.0, (step + 1) / cfg.sparsity_warm_up_steps)
                                                      if cfg.sparsity_warm_up_steps else 1.0)
        sp = sparsity_loss(model, acts, pre, cfg.sparsity_mode, cfg.tanh_scale)
        dead = since_fired >= dead_window
        loss = mse + coeff * sp
        if cfg.pre_act_loss_coefficient > 0:
            loss = loss + cfg.pre_act_loss_coefficient * pre_act_loss(model, pre, dead)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.threshold.clamp_(min=0.0)  # as SAELens: a negative threshold would pass negative pre-acts
            fired = (acts > 0).any(0)
            since_fired += 1
            since_fired[fired] = 0
            if (cfg.l0_control_kp > 0 or cfg.l0_control_ki > 0) and step + 1 >= cfg.sparsity_warm_up_steps:
                # the average starts after the warm-up: the warm-up's L0 burst must not drive the coefficient
                l0_batch = float((acts > 0).float().sum(-1).mean())
                l0_ema = l0_batch if l0_ema is None else 0.9 * l0_ema + 0.1 * l0_batch
                control, error_sum = l0_controller_step(l0_ema, cfg.target_l0, error_sum, cfg.l0_control_kp,
                                                        cfg.l0_control_ki)
        if (step + 1) % cfg.log_every == 0 or step + 1 == n_steps:
            with torch.no_grad():
                last = {"step": step + 1, "tokens": (step + 1) * cfg.data.batch_size, "loss": float(loss),
                        "mse_loss": float(mse), "sparsity_loss": float(sp),
                        "l0": float((acts > 0).float().sum(-1).mean()),  # per layer, averaged over layers
                        "explained_variance": 1 - _fvu(y.reshape(len(y), -1), y_hat.reshape(len(y), -1)),
                        "dead_fraction": float(dead.float().mean()), "lr": sched.get_last_lr()[0],
                        "sparsity_coefficient": coeff}
            curves.append(last)
            if wandb_run is not None:
                wandb_run.log(last, step=step + 1)
    model.fold_scales(in_scale, out_scale)
    return curves, {"in_scale": in_scale.tolist(), "out_scale": out_scale.tolist(), "final_train": last,
                    "threshold_init": threshold_init}


def l0_controller_step(l0: float, target_l0: float, error_sum: float, kp: float, ki: float) -> tuple[float, float]:
    """One step of the L0 controller: ``(multiplier of the sparsity coefficient, new error sum)`` with
    e = log(l0 / target_l0): exp(clamp(kp e, ±log 10) + ki (error_sum + e)), kept in [1e-3, 1e3]."""
    e = math.log(max(l0, 1e-3) / target_l0)
    error_sum += e
    p = min(math.log(10.0), max(-math.log(10.0), kp * e))
    return min(1e3, max(1e-3, math.exp(p + ki * error_sum))), error_sum


# ----------------------------------------------------------------------------- save / load


def _saelens_layer_state(model: JumpReLUTranscoderStack, i: int) -> dict[str, torch.Tensor]:
    state = {"W_enc": model.W_enc[i], "b_enc": model.b_enc[i], "threshold": model.threshold[i],
             "W_dec": model.W_dec_stack[i], "b_dec": model.b_dec[i]}
    if model.W_skip is not None:
        state["W_skip"] = model.W_skip[i]
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def save_stack(model: JumpReLUTranscoderStack, folder: Path, *, layers: list[int], in_hooks: list[str],
               out_hooks: list[str], metadata: dict[str, Any]) -> dict[str, Any]:
    """Write `model` in the documented format into `folder`; return the index."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"kind": model.kind, "layers": layers, "in_hooks": in_hooks, "out_hooks": out_hooks,
                             "d_in": model.d_in, "d_out": model.d_out, "d_sae": model.d_sae}
    if model.kind == "clt":
        tensors = {"W_enc": model.W_enc, "b_enc": model.b_enc, "threshold": model.threshold, "b_dec": model.b_dec}
        tensors.update({f"W_dec_{i}": W for i, W in enumerate(model.W_dec)})
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, folder / CLT_WEIGHTS)
        cfg = {"architecture": "jumprelu_clt", **index, "bandwidth": model.bandwidth, "dtype": "float32",
               "metadata": metadata}
        (folder / CLT_CFG).write_text(json.dumps(check_document(CltConfig, cfg), indent=2))
        index["files"] = [CLT_CFG, CLT_WEIGHTS]
        return index
    from sae_lens.saes.transcoder import JumpReLUSkipTranscoderConfig, JumpReLUTranscoderConfig

    cfg_cls = JumpReLUSkipTranscoderConfig if model.kind == "skip" else JumpReLUTranscoderConfig
    index["files"] = []
    for i, layer in enumerate(layers):
        sub = folder / f"layer_{layer}"
        sub.mkdir()
        meta = {**metadata, "hook_name": in_hooks[i], "hook_name_out": out_hooks[i], "hook_layer": layer}
        cfg = cfg_cls(d_in=model.d_in, d_sae=model.d_sae, d_out=model.d_out, apply_b_dec_to_input=False,
                      dtype="float32", device="cpu")
        for k, v in meta.items():
            cfg.metadata[k] = v
        (sub / "cfg.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        save_file(_saelens_layer_state(model, i), sub / "sae_weights.safetensors")
        index["files"].append(f"layer_{layer}")
        if len(layers) == 1:  # the top-level folder is itself SAELens-loadable
            shutil.copy(sub / "cfg.json", folder / "cfg.json")
            shutil.copy(sub / "sae_weights.safetensors", folder / "sae_weights.safetensors")
    return index


def read_transcoder_index(folder: str | Path) -> dict[str, Any]:
    """The ``transcoder.json`` index of a folder written by `train_transcoder` (kind, layers, hooks)."""
    index_path = Path(folder) / TRANSCODER_INDEX
    if not index_path.exists():
        raise DataError(f"{index_path} is missing: {folder} is not a transcoder folder written by "
                        "train_transcoder (re-run that stage)")
    return load_document(index_path, TranscoderIndex, fix="re-run train_transcoder")


def load_transcoder(folder: str | Path) -> JumpReLUTranscoderStack:
    """Load any transcoder written by `train_transcoder` as a `JumpReLUTranscoderStack`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = read_transcoder_index(folder)
    L = len(index["layers"])
    if index["kind"] == "clt":
        cfg = load_document(folder / CLT_CFG, CltConfig, fix="re-run train_transcoder")
        model = JumpReLUTranscoderStack(L, cfg["d_in"], cfg["d_out"], cfg["d_sae"], "clt", bandwidth=cfg["bandwidth"])
        state = load_file(folder / CLT_WEIGHTS)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "threshold", "b_dec"):
                getattr(model, name).copy_(state[name])
            for i, W in enumerate(model.W_dec):
                W.copy_(state[f"W_dec_{i}"])
        return model
    model = JumpReLUTranscoderStack(L, index["d_in"], index["d_out"], index["d_sae"], index["kind"])
    with torch.no_grad():
        for i, sub in enumerate(index["files"]):
            st = load_file(folder / sub / "sae_weights.safetensors")
            for name, target in (("W_enc", model.W_enc), ("b_enc", model.b_enc), ("threshold", model.threshold),
                                 ("W_dec", model.W_dec_stack), ("b_dec", model.b_dec)):
                target[i].copy_(st[name])
            if model.W_skip is not None:
                model.W_skip[i].copy_(st["W_skip"])
    return model


# ----------------------------------------------------------------------------- stage


def resolve_manifests(cfg: TranscoderConfig,
                      manifests: list[Path]) -> tuple[list[Path], list[Path], list[str], list[str]]:
    by_hook: dict[str, Path] = {}
    for m in manifests:
        man, _ = load_manifest(m)
        by_hook[man.hook] = manifest_path(m)
    in_hooks = [cfg.in_hook.format(layer=l) for l in cfg.layers]
    out_hooks = [cfg.out_hook.format(layer=l) for l in cfg.layers]
    missing = [h for h in in_hooks + out_hooks if h not in by_hook]
    if missing:
        raise ConfigError(f"transcoder.layers={cfg.layers} needs harvests of hooks {missing}, but the manifests "
                          f"passed hold {sorted(by_hook)}; add them to harvest.hooks and re-run harvest")
    return [by_hook[h] for h in in_hooks], [by_hook[h] for h in out_hooks], in_hooks, out_hooks


def train_transcoder(cfg: TranscoderConfig | Mapping[str, Any], *, manifests: list[Path], out_dir: Path,
                     model_cfg: dict | None = None,
                     wandb_cfg: dict | None = None) -> dict[str, Any]:
    """Train a per-layer / skip / cross-layer transcoder; write it to `out_dir` (format above).

    Args:
        cfg: the `transcoder` config group.
        manifests: harvest manifests of the hooks `cfg.in_hook` and `cfg.out_hook` at every
            layer of `cfg.layers` (extra manifests are ignored; all must share shards).
        out_dir: output folder, replaced atomically.
        model_cfg: the `model` group (its name must match the manifests' model).
        wandb_cfg: the `wandb` group for `mechflow.tracking.stage_run`.
    """
    from mechflow.tracking import stage_run

    cfg = parse_config(TranscoderConfig, cfg, "transcoder")
    if cfg.kind != "clt" and cfg.layers != sorted(set(cfg.layers)):
        raise ConfigError(f"transcoder.layers={cfg.layers} must be increasing without repeats")
    if cfg.kind == "clt" and cfg.layers != list(range(cfg.layers[0], cfg.layers[-1] + 1)):
        raise ConfigError(f"transcoder.layers={cfg.layers}: a CLT spans consecutive layers, e.g. [0, 1, 2, 3]")
    in_paths, out_paths, in_hooks, out_hooks = resolve_manifests(cfg, list(manifests))
    first, _ = load_manifest(in_paths[0])
    d_ins = {load_manifest(p)[0].d for p in in_paths}
    d_outs = {load_manifest(p)[0].d for p in out_paths}
    if len(d_ins) != 1 or len(d_outs) != 1:
        raise DataError(f"in-hook widths {d_ins} / out-hook widths {d_outs} differ across layers; "
                        "transcoders need one width per side")
    d_in, d_out = d_ins.pop(), d_outs.pop()
    if model_cfg and model_cfg.get("name") and model_cfg["name"] != first.model:
        raise ConfigError(f"model.name={model_cfg['name']!r} but the manifests were harvested from {first.model!r}")
    train_shards, holdout = split_shards(first, cfg.data.holdout_shards, "transcoder.data.holdout_shards")
    all_paths = in_paths + out_paths
    source = ShardSource(all_paths, [s.file for s in train_shards], exclude_bos=cfg.data.exclude_bos,
                         verify_sha256=cfg.data.verify_sha256)
    if cfg.data.clip_outliers is not None:
        raise ConfigError(f"transcoder.data.clip_outliers={cfg.data.clip_outliers}: clipping rescales whole rows, but "
                          "an MLP's output does not scale with its input; use transcoder.data.drop_outliers or null")
    drop_outlier_rows(source, cfg.data.drop_outliers)  # by the first in-hook's norm
    stream = ActivationStream(source, batch_size=cfg.data.batch_size, buffer_rows=cfg.data.buffer_rows,
                              chunk_rows=cfg.data.chunk_rows, seed=cfg.seed, prefetch=cfg.data.prefetch)
    n_steps = cfg.training_tokens // cfg.data.batch_size
    if n_steps < 1:
        raise ConfigError(f"transcoder.training_tokens={cfg.training_tokens} is less than one batch "
                          f"({cfg.data.batch_size}); raise it")
    torch.manual_seed(cfg.seed)
    model = JumpReLUTranscoderStack(len(cfg.layers), d_in, d_out, cfg.d_sae, cfg.kind,
                                    cfg.jumprelu_init_threshold, cfg.jumprelu_bandwidth, cfg.seed)
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    config_dump = cfg.model_dump(mode="json")
    with stage_run("train_transcoder", config_dump, out_dir.parent, wandb_cfg, name=out_dir.name) as run:
        curves, extra = train_stack(model, stream, cfg, n_steps, run)
    stream.close()
    seconds = time.perf_counter() - t0
    model.eval()
    heldout = None
    if holdout:
        heldout = heldout_metrics(model, ShardSource(all_paths, [s.file for s in holdout],
                                                     exclude_bos=cfg.data.exclude_bos), cfg)
        heldout.pop("_mean_target")
    sha = {str(p): sha256_file(p) for p in all_paths}
    metadata = {"model_name": first.model, "context_size": first.context_size, "prepend_bos": first.prepend_bos,
                "mechflow_manifest_sha256": sha}
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    index = save_stack(model, tmp, layers=cfg.layers, in_hooks=in_hooks, out_hooks=out_hooks, metadata=metadata)
    write_document(tmp / TRANSCODER_INDEX, TranscoderIndex, index)
    summary = {"stage": "train_transcoder", "config": config_dump, "model": first.model, "kind": cfg.kind,
               "layers": cfg.layers, "in_hooks": in_hooks, "out_hooks": out_hooks, "manifests_sha256": sha,
               "train_shards": [s.file for s in train_shards], "holdout_shards": [s.file for s in holdout],
               "exclude_bos": source.exclude_bos,
               "outlier_filter": source.outlier_summary(),
               "training_steps": n_steps,
               "training_tokens": n_steps * cfg.data.batch_size, "seconds": round(seconds, 3),
               "tokens_per_second": round(n_steps * cfg.data.batch_size / max(seconds, 1e-9), 1),
               **extra, "heldout": heldout}
    write_document(tmp / TRAINING_SUMMARY, TranscoderTraining, summary)
    write_curves_csv(curves, tmp / CURVES_CSV)
    plot_curves(curves, tmp / CURVES_PNG, f"{cfg.kind} transcoder, {first.model} layers {cfg.layers}")
    replace_dir(tmp, out_dir)
    log.info("trained %s transcoder (layers %s) in %.1f s -> %s", cfg.kind, cfg.layers, seconds, out_dir)
    return summary


@torch.no_grad()
def heldout_metrics(model: JumpReLUTranscoderStack, source: ShardSource, cfg: TranscoderConfig) -> dict[str, Any]:
    """FVU per output layer and overall, L0 per layer, dead fraction on held-out rows (raw units)."""
    L, d_in, d_out = model.n_layers, model.d_in, model.d_out
    n, sse, sq = 0, torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
    ysum = torch.zeros(L, d_out, dtype=torch.float64)
    fire = torch.zeros(L, model.d_sae, dtype=torch.float64)
    l0 = torch.zeros(L, dtype=torch.float64)
    for rows, _ in source.iter_sequential(max(cfg.eval.batch_size, 1024), cfg.eval.max_tokens):
        t = torch.from_numpy(rows)
        x, y = t[:, :L * d_in].reshape(-1, L, d_in), t[:, L * d_in:].reshape(-1, L, d_out).double()
        acts, _ = model.encode(x)
        y_hat = model.decode(acts, x).double()
        n += len(t)
        sse += (y - y_hat).pow(2).sum((0, 2))
        sq += y.pow(2).sum((0, 2))
        ysum += y.sum(0)
        fire += (acts > 0).sum(0)
        l0 += (acts > 0).sum((0, 2))
    source.close()
    if n == 0:
        raise DataError(f"held-out shards {source.shard_names} hold no usable rows")
    var = sq - ysum.pow(2).sum(-1) / n
    fvu = sse / var
    return {"_mean_target": (ysum / n).float(), "n_tokens": n, "fvu_per_layer": fvu.tolist(),
            "fvu": float(sse.sum() / var.sum()),
            "explained_variance": float(1 - sse.sum() / var.sum()), "l0_per_layer": (l0 / n).tolist(),
            "dead_fraction": float((fire == 0).double().mean()), "dead_window_tokens": n,
            "dead_window_sufficient": n >= cfg.eval.dead_min_tokens}
