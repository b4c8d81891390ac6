"""Held-out quality metrics of a sparse dictionary (SAE or transcoder).

The metrics `evaluate_dictionary` (`mechflow.dictionaries.evaluate`) reports, step by step:

1. Stream the held-out shards (non-BOS positions when the harvest prepended BOS) once to get
   every position's target norm and its median; positions with norm > `outlier_factor` x
   median are outliers (massive-activation positions, Sun et al. 2024).
2. Stream them again through the dictionary, accumulating in float64:
   explained variance EV = 1 - sum||y - y_hat||^2 / sum||y - mean(y)||^2 (SAELens' definition,
   `metrics/explained_variance`), FVU = 1 - EV, both on inliers (headline) and on all
   positions; L0 (mean active latents per token); per-latent firing counts, giving dead
   latents (never fire over the held-out tokens) and dense latents (fire on more than
   `dense_threshold` of them); the mean target vector (for mean ablation).
3. Run the model on held-out contexts (from the corpus `tokens.parquet`) four ways: clean,
   with the dictionary spliced in at its hook, with the hook zero-ablated and mean-ablated
   (all at non-BOS positions). CE loss is the mean next-token cross-entropy over every
   prediction of the context; KL is KL(clean || patched) per prediction, averaged.
   CE recovered (SAELens' "CE loss score") = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)
   against zero and against mean ablation; the KL score analogously
   (KL_ablated - KL_spliced) / KL_ablated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mechflow.dictionaries.config import EvalConfig, parse_config
from mechflow.dictionaries.data import ShardSource
from mechflow.errors import DataError

log = logging.getLogger(__name__)

EncodeDecode = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def sae_encode_decode(sae) -> EncodeDecode:
    """(latents, reconstruction) of a SAELens SAE or transcoder."""

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acts = sae.encode(x.to(sae.dtype))
        if acts.is_sparse:
            acts = acts.to_dense()
        recon = sae.decode(acts)
        if hasattr(sae, "W_skip"):  # SAELens' skip transcoders add the skip term in forward only
            recon = recon + x.to(sae.dtype) @ sae.W_skip.T
        return acts, recon

    return fn


@torch.no_grad()
def reconstruction_metrics(dictionary: Any, source: ShardSource, cfg: EvalConfig | dict | None = None,
                           d_in: int | None = None) -> dict[str, Any]:
    """Reconstruction metrics of `dictionary` on every (non-BOS) row of `source`.

    Args:
        dictionary: a SAELens SAE/transcoder, or a function x -> (latents, reconstruction).
        source: held-out rows. For transcoders its rows are [input | target] and `d_in` splits them.
        cfg: evaluation settings (`max_tokens`, `outlier_factor`, `dead_min_tokens`, ...).
        d_in: input width when the target differs from the input (transcoders).
    """
    cfg = parse_config(EvalConfig, cfg, "eval")
    fn = dictionary if callable(dictionary) and not isinstance(dictionary, torch.nn.Module) \
        else sae_encode_decode(dictionary)
    chunk = max(cfg.batch_size, 1024)

    def split(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.from_numpy(rows)
        return (t, t) if d_in is None else (t[:, :d_in], t[:, d_in:])

    norms_all = source.row_norms(slice(d_in, None), chunk, cfg.max_tokens)  # the target part
    if not len(norms_all):
        raise DataError(f"held-out shards {source.shard_names} hold no usable rows; hold out more shards "
                        "(data.holdout_shards) or harvest more tokens")
    median = float(np.median(norms_all))
    cut = cfg.outlier_factor * median

    d_out = None
    acc = {k: {"n": 0, "sq": 0.0, "sse": 0.0, "sum": None} for k in ("all", "inlier")}
    fire = None
    l0_sum = 0.0
    for rows, _ in source.iter_sequential(chunk, cfg.max_tokens):
        x_all, y_all = split(rows)
        for i in range(0, len(x_all), cfg.batch_size):
            x, y = x_all[i:i + cfg.batch_size], y_all[i:i + cfg.batch_size].double()
            latents, recon = fn(x)
            active = latents != 0
            fire = active.sum(0).double() if fire is None else fire + active.sum(0).double()
            l0_sum += float(active.sum())
            err = (y - recon.double()).pow(2).sum(1)
            sq = y.pow(2).sum(1)
            inl = y.norm(dim=1) <= cut
            d_out = y.shape[1]
            for key, mask in (("all", torch.ones_like(inl)), ("inlier", inl)):
                a = acc[key]
                a["n"] += int(mask.sum())
                a["sq"] += float(sq[mask].sum())
                a["sse"] += float(err[mask].sum())
                s = y[mask].sum(0)
                a["sum"] = s if a["sum"] is None else a["sum"] + s
    assert fire is not None and d_out is not None
    n = acc["all"]["n"]
    out: dict[str, Any] = {"n_tokens": n, "median_norm": median, "outlier_factor": cfg.outlier_factor,
                           "n_outliers": n - acc["inlier"]["n"], "outlier_fraction": (n - acc["inlier"]["n"]) / n}
    for key, suffix in (("inlier", ""), ("all", "_with_outliers")):
        a = acc[key]
        mean = a["sum"] / max(a["n"], 1)
        total_var = a["sq"] - a["n"] * float(mean.pow(2).sum())
        ev = 1.0 - a["sse"] / total_var if total_var > 0 else float("nan")
        out[f"explained_variance{suffix}"] = ev
        out[f"fvu{suffix}"] = 1.0 - ev
        out[f"mse{suffix}"] = a["sse"] / max(a["n"], 1) / d_out
    d_sae = fire.numel()
    freq = fire / n
    out.update({
        "l0": l0_sum / n,
        "d_sae": d_sae,
        "dead_features": int((fire == 0).sum()),
        "dead_fraction": float((fire == 0).sum()) / d_sae,
        "dead_window_tokens": n,
        "dead_window_sufficient": n >= cfg.dead_min_tokens,
        "dense_threshold": cfg.dense_threshold,
        "dense_features": int((freq > cfg.dense_threshold).sum()),
        "dense_fraction": float((freq > cfg.dense_threshold).sum()) / d_sae,
    })
    if n < cfg.dead_min_tokens:
        log.warning("dead-latent count uses %d held-out tokens, fewer than eval.dead_min_tokens=%d: "
                    "latents firing rarer than that may be counted dead", n, cfg.dead_min_tokens)
    out["_mean_target"] = (acc["all"]["sum"] / n).float()
    return out


# ----------------------------------------------------------------------------- CE / KL


def _ce_and_kl(logits: torch.Tensor, tokens: torch.Tensor, clean_logp: torch.Tensor | None
               ) -> tuple[float, float, int, torch.Tensor]:
    """Summed next-token CE and KL(clean || this) over predictions 0..T-2; also log-probs."""
    logp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    ce = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    kl = 0.0
    if clean_logp is not None:
        kl = float((clean_logp.exp() * (clean_logp - logp)).sum(-1).sum())
    return float(ce.sum()), kl, ce.numel(), logp


@torch.no_grad()
def ce_metrics(model, tokens: torch.Tensor, hooks: dict[str, list[tuple[str, Callable]]],
               batch_size: int = 8) -> dict[str, float]:
    """CE/KL of `model` on `tokens` clean and under each named list of forward hooks.

    Args:
        model: a TransformerLens HookedTransformer.
        tokens: ``[n_contexts, T]`` token ids.
        hooks: e.g. ``{"spliced": [...], "zero": [...], "mean": [...]}``; each value is a
            `fwd_hooks` list for `model.run_with_hooks`.
    """
    sums = {k: [0.0, 0.0] for k in ("clean", *hooks)}
    count = 0
    for i in range(0, len(tokens), batch_size):
        tok = tokens[i:i + batch_size]
        ce, _, n, clean_logp = _ce_and_kl(model(tok, return_type="logits"), tok, None)
        sums["clean"][0] += ce
        count += n
        for name, fwd_hooks in hooks.items():
            logits = model.run_with_hooks(tok, return_type="logits", fwd_hooks=fwd_hooks)
            ce, kl, _, _ = _ce_and_kl(logits, tok, clean_logp)
            sums[name][0] += ce
            sums[name][1] += kl
    out = {f"ce_{k}": v[0] / count for k, v in sums.items()}
    out.update({f"kl_{k}": v[1] / count for k, v in sums.items() if k != "clean"})
    out["n_predictions"] = count
    if "spliced" in hooks:
        out["ce_increase"] = out["ce_spliced"] - out["ce_clean"]
        for abl in ("zero", "mean"):
            if abl in hooks:
                out[f"ce_recovered_{abl}"] = ((out[f"ce_{abl}"] - out["ce_spliced"])
                                              / (out[f"ce_{abl}"] - out["ce_clean"]))
                out[f"kl_score_{abl}"] = (out[f"kl_{abl}"] - out["kl_spliced"]) / out[f"kl_{abl}"]
    return out


def sae_splice_hooks(sae, hook: str, mean: torch.Tensor, start: int) -> dict[str, list[tuple[str, Callable]]]:
    """Hooks replacing `hook` at positions >= `start` by the SAE reconstruction, zero, or `mean`."""
    fn = sae_encode_decode(sae)

    def spliced(act, hook=None):
        act = act.clone()
        act[:, start:] = fn(act[:, start:])[1].to(act.dtype)
        return act

    def zero(act, hook=None):
        act = act.clone()
        act[:, start:] = 0
        return act

    def mean_abl(act, hook=None):
        act = act.clone()
        act[:, start:] = mean.to(act.dtype)
        return act

    return {"spliced": [(hook, spliced)], "zero": [(hook, zero)], "mean": [(hook, mean_abl)]}


def transcoder_splice_hooks(tc, in_hook: str, out_hook: str, mean: torch.Tensor, start: int
                            ) -> dict[str, list[tuple[str, Callable]]]:
    """Hooks replacing the MLP output (`out_hook`) by the transcoder's prediction from `in_hook`."""
    fn = sae_encode_decode(tc)
    store: dict[str, torch.Tensor] = {}

    def grab(act, hook=None):
        store["x"] = act
        return act

    def spliced(act, hook=None):
        act = act.clone()
        act[:, start:] = fn(store["x"][:, start:])[1].to(act.dtype)
        return act

    hooks = sae_splice_hooks(tc, out_hook, mean, start)
    hooks["spliced"] = [(in_hook, grab), (out_hook, spliced)]
    return hooks


def stack_splice_hooks(stack, in_hooks: list[str], out_hooks: list[str], means: torch.Tensor, start: int
                       ) -> dict[str, list[tuple[str, Callable]]]:
    """Hooks replacing every MLP output of a transcoder stack (per-layer, skip or CLT) at once.

    ``spliced``: layer i's MLP output becomes the stack's prediction from the MLP inputs seen IN
    THIS forward (a CLT's layer i reads the latents of layers <= i, whose inputs already follow
    the earlier replacements: the replacement model, as the attribution graphs use it).
    ``zero`` / ``mean``: every one of those MLP outputs zeroed / set to its held-out mean ``means[i]``.
    """
    L = len(in_hooks)
    store: dict[int, torch.Tensor] = {}
    acts: dict[int, torch.Tensor] = {}

    def grab(i: int):
        def hook_fn(act, hook=None):
            store[i] = act[:, start:]
            if i == 0:
                acts.clear()
            return act
        return hook_fn

    def spliced(i: int):
        def hook_fn(act, hook=None):
            x = store[i]
            flat = x.reshape(-1, x.shape[-1]).to(stack.W_enc.dtype)
            acts[i] = stack.encode_layer(i, flat)
            out = stack.decode_layer(i, acts, flat)
            act = act.clone()
            act[:, start:] = out.reshape(*x.shape[:-1], -1).to(act.dtype)
            return act
        return hook_fn

    def ablate(i: int, value):
        def hook_fn(act, hook=None):
            act = act.clone()
            act[:, start:] = value(i)
            return act
        return hook_fn

    return {
        "spliced": [h for i in range(L) for h in ((in_hooks[i], grab(i)), (out_hooks[i], spliced(i)))],
        "zero": [(out_hooks[i], ablate(i, lambda j: 0.0)) for i in range(L)],
        "mean": [(out_hooks[i], ablate(i, lambda j: means[j])) for i in range(L)],
    }
