"""Feature analysis of a trained SAE: what each latent reads, what it writes, what it does for a task.

Steps of `feature_analysis` (one SAELens folder written by `train_sae`):

1. **Stream the harvest** of the SAE's hook (every shard, non-BOS rows when the SAE was trained
   without BOS) in batches of `batch_rows`; encode each batch and keep, per latent, a running
   top-k of activations with their (context_id, position), the firing count, sums, the maximum
   and a histogram of log10(activation) over fixed bins. Memory: one batch of latents plus
   O(d_sae x top_contexts); nothing else is held.
2. **Logit effects** (Bricken et al. 2023, "Towards Monosemanticity"; Neuronpedia's logit weights):
   each latent's decoder direction times the unembedding, through the model's final norm as
   `unembed_directions` documents (RMSNorm: its weight is applied, its 1/RMS(x) is not).
   Direct path only: the blocks after the hook are skipped.
3. **Task attribution** (Marks et al. 2024, "Sparse feature circuits"; attribution patching:
   Nanda 2023, Syed et al. 2023): the SAE is spliced in at its hook (positions after BOS),
   by default with its error term x - x_hat kept so the spliced model computes exactly what
   the model computes. Per latent i, attribution_i = sum_pos (a_clean - a_target)_i * dm/da_i
   at the clean prompt, a_target being the latent's value on the corrupted prompt (or 0 with
   `ablation: zero`): the first-order estimate of m(clean) - m(latent i patched to a_target),
   so a positive score means the latent drives the metric.
4. **Verification by exact ablation**: the top `n_verify` latents by |attribution| are patched,
   one at a time and then all together, to their target values in the spliced model
   (everything downstream recomputed); the exact metric change is compared with the
   attribution (Pearson, Spearman, sign agreement, errors).
5. **Records**: the selected latents (the top attributed ones plus `n_features` live latents,
   a seeded random sample or the most frequent); the windows of their top contexts are read
   from the corpus `tokens.parquet` (row batches, only the needed contexts kept) and decoded.
6. `features.jsonl` (one record per latent: feature, hook, layer, stats with its histogram,
   top contexts, logit effects, task attribution), one self-contained `features.html` (every
   text escaped, the figure inlined), `histograms.png`, `task_attribution.parquet` (one row per
   task x latent: attribution and its std over prompts, rank by |attribution|, clean and target
   activation summed over positions and averaged over prompts, verified, exact_effect) and
   `summary.json` (per task: metric of the model / spliced model / corrupted prompts, the
   agreement, the joint ablation of the verified latents), each written atomically.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechflow.contracts.dictionaries import DictionaryTraining, FeatureSummary
from mechflow.contracts.documents import load_document, write_document
from mechflow.contracts.hooks import hook_layer
from mechflow.dictionaries.config import FeaturesConfig, SAEConfig, parse_config
from mechflow.dictionaries.data import ShardSource, load_manifest, manifest_path
from mechflow.errors import ConfigError, DataError
from mechflow.io import (
    atomic_path,
    atomic_write_text,
    sha256_file,
    to_json,
)

log = logging.getLogger(__name__)

# log10(activation) histogram bins shared by every latent: 1e-4 .. 1e4, 10 bins per decade.
# Values outside the range fall into the first / last bin (counted, never dropped).
HIST_LOG10_LO, HIST_LOG10_HI, HIST_BINS_PER_DECADE = -4.0, 4.0, 10
N_HIST_BINS = int((HIST_LOG10_HI - HIST_LOG10_LO) * HIST_BINS_PER_DECADE)
# Hooks whose activations live in the residual-stream basis (what W_U reads).
RESIDUAL_HOOK = re.compile(r"(^|\.)(hook_resid_(pre|mid|post)|hook_attn_out|hook_mlp_out|hook_embed)$")


# ----------------------------------------------------------------------------- 1. streaming stats


@dataclass
class FeatureStats:
    """Per-latent statistics over `n_tokens` harvest rows (all tensors indexed by latent).

    Attributes:
        top_values / top_context / top_position: ``[k, d_sae]``, sorted descending per latent;
            empty slots (the latent fired fewer than k times) hold value 0 and context -1.
        count: rows where the latent is non-zero; `sum`, `sum_sq`: of its activations (float64).
        max: largest activation; `hist`: ``[d_sae, N_HIST_BINS]`` counts of log10(|activation|).
    """

    n_tokens: int
    top_values: Tensor
    top_context: Tensor
    top_position: Tensor
    count: Tensor
    sum: Tensor
    sum_sq: Tensor
    max: Tensor
    hist: Tensor

    @property
    def frequency(self) -> Tensor:
        return self.count.double() / max(self.n_tokens, 1)

    @property
    def live(self) -> Tensor:
        return self.count > 0

    def feature_stats(self, i: int) -> dict[str, Any]:
        n = int(self.count[i])
        mean = float(self.sum[i]) / n if n else 0.0
        var = max(float(self.sum_sq[i]) / n - mean * mean, 0.0) if n else 0.0
        return {"n_tokens": self.n_tokens, "n_active": n, "frequency": n / max(self.n_tokens, 1),
                "mean_active": mean, "std_active": math.sqrt(var), "max": float(self.max[i]) if n else 0.0,
                "hist": {"log10_lo": HIST_LOG10_LO, "log10_hi": HIST_LOG10_HI,
                         "bins_per_decade": HIST_BINS_PER_DECADE, "counts": self.hist[i].tolist()}}

    def top_contexts(self, i: int) -> list[tuple[float, int, int]]:
        """(activation, context_id, position) of latent `i`, highest first, firing entries only."""
        out = []
        for v, c, p in zip(self.top_values[:, i].tolist(), self.top_context[:, i].tolist(),
                           self.top_position[:, i].tolist()):
            if v > 0:
                out.append((float(v), int(c), int(p)))
        return out


def log10_bins(values: Tensor) -> Tensor:
    """Histogram bin of each |value| (> 0) on the shared log10 grid, clamped to the end bins."""
    b = torch.floor((values.abs().double().log10() - HIST_LOG10_LO) * HIST_BINS_PER_DECADE)
    return b.clamp(0, N_HIST_BINS - 1).long()


def merge_top_k(top: tuple[Tensor, Tensor, Tensor], feats: Tensor, values: Tensor, ctx: Tensor, pos: Tensor,
                k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Merge sparse (feature, value, context, position) entries into per-latent top-k tables.

    `top` holds ``[k, d_sae]`` values (0 = empty slot), contexts and positions. Only positive
    values compete. Ties keep the earlier entry (the table first, then input order): two
    stable sorts, by value descending and then by latent, give each entry its rank in its latent.
    """
    top_v, top_c, top_p = top
    d_sae = top_v.shape[1]
    slot, col = (top_v > 0).nonzero(as_tuple=True)
    pos_mask = values > 0
    cand_f = torch.cat([col, feats[pos_mask]])
    cand_v = torch.cat([top_v[slot, col], values[pos_mask].to(top_v.dtype)])
    cand_c = torch.cat([top_c[slot, col], ctx[pos_mask]])
    cand_p = torch.cat([top_p[slot, col], pos[pos_mask]])
    o1 = torch.argsort(cand_v, descending=True, stable=True)
    order = o1[torch.argsort(cand_f[o1], stable=True)]
    fs = cand_f[order]
    counts = torch.bincount(fs, minlength=d_sae)
    rank = torch.arange(len(fs)) - (torch.cumsum(counts, 0) - counts)[fs]
    keep = rank < k
    new_v, new_c, new_p = torch.zeros_like(top_v), torch.full_like(top_c, -1), torch.full_like(top_p, -1)
    idx = (rank[keep], fs[keep])
    new_v[idx], new_c[idx], new_p[idx] = cand_v[order][keep], cand_c[order][keep], cand_p[order][keep]
    return new_v, new_c, new_p


@torch.no_grad()
def stream_feature_stats(encode: Callable[[Tensor], Tensor], source: ShardSource, *, d_sae: int, k: int,
                         batch_rows: int = 4096, max_tokens: int | None = None, progress: bool = True
                         ) -> FeatureStats:
    """One pass over `source`: running top-k contexts, firing counts and histograms of every latent.

    Works on the non-zero entries only (L0 per token, not d_sae), so the bookkeeping costs a
    small fraction of the encoder's matmul.

    Args:
        encode: ``[rows, d_in] -> [rows, d_sae]`` latents (e.g. a SAELens ``sae.encode``).
        source: the harvest rows (BOS already dropped by the source when asked).
        k: contexts kept per latent.
    """
    count = torch.zeros(d_sae, dtype=torch.long)
    total = torch.zeros(d_sae, dtype=torch.float64)
    total_sq = torch.zeros(d_sae, dtype=torch.float64)
    hist = torch.zeros(d_sae * N_HIST_BINS, dtype=torch.long)
    top: tuple[Tensor, Tensor, Tensor] | None = None
    vmax: Tensor | None = None
    n = 0
    usable = source.n_rows - (sum(s.last_context - s.first_context + 1 for s in source.shards[0])
                              if source.exclude_bos else 0)
    expected = min(usable, max_tokens) if max_tokens else usable
    bar = tqdm(total=expected, desc="feature stats", unit="tok", disable=not progress)
    for rows, meta in source.iter_sequential(batch_rows, max_tokens):
        lat = encode(torch.from_numpy(rows))
        if lat.is_sparse:
            lat = lat.to_dense()
        if lat.shape[1] != d_sae:
            raise ConfigError(f"the dictionary returned {lat.shape[1]} latents per row, expected d_sae={d_sae}")
        if top is None:
            top = (torch.zeros(k, d_sae, dtype=lat.dtype), torch.full((k, d_sae), -1, dtype=torch.long),
                   torch.full((k, d_sae), -1, dtype=torch.long))
        n += len(lat)
        r, f = lat.nonzero(as_tuple=True)
        v = lat[r, f]
        v64 = v.double()
        count += torch.bincount(f, minlength=d_sae)
        total.index_add_(0, f, v64)
        total_sq.index_add_(0, f, v64 * v64)
        vmax = lat.amax(0) if vmax is None else torch.maximum(vmax, lat.amax(0))
        hist.index_add_(0, f * N_HIST_BINS + log10_bins(v), torch.ones_like(f))
        ctx = torch.from_numpy(meta[:, 0].astype(np.int64))
        pos = torch.from_numpy(meta[:, 1].astype(np.int64))
        top = merge_top_k(top, f, v, ctx[r], pos[r], k)
        bar.update(len(lat))
    bar.close()
    if top is None or vmax is None:
        raise DataError(f"harvest shards {source.shard_names} hold no usable rows for feature statistics; "
                        "re-run the harvest stage")
    return FeatureStats(n_tokens=n, top_values=top[0], top_context=top[1], top_position=top[2], count=count,
                        sum=total, sum_sq=total_sq, max=vmax, hist=hist.view(d_sae, N_HIST_BINS))


# ----------------------------------------------------------------------------- 2. logit effects


def check_sae(sae: Any, where: Path | str) -> None:
    """Refuse dictionaries whose decoder is not one fixed affine map (so latents can be patched)."""
    if hasattr(sae.cfg, "d_out"):
        raise ConfigError(f"{where} is a transcoder; feature_analysis reads SAE folders (rule train_sae)")
    norm = getattr(sae.cfg, "normalize_activations", "none")
    if norm in ("constant_norm_rescale", "layer_norm"):
        raise ConfigError(f"{where}: normalize_activations={norm!r} rescales the decoder output per token, so a "
                          "latent has no fixed decoder direction; fold the normalisation into the weights first")
    if getattr(sae.cfg, "reshape_activations", "none") == "hook_z":
        raise ConfigError(f"{where}: hook_z SAEs are not supported by feature_analysis (train on a residual hook)")


@torch.no_grad()
def effective_decoder(sae: Any, chunk: int = 1024) -> Tensor:
    """``[d_sae, d_in]``: what one unit of each latent adds to the reconstruction.

    decode(e_i) - decode(0), so SAELens' decoder-norm rescaling and scaling factors are included.
    """
    d_sae = sae.cfg.d_sae
    zero = sae.decode(torch.zeros(1, d_sae, dtype=sae.dtype, device=sae.device))
    rows = []
    for a in range(0, d_sae, chunk):
        eye = torch.zeros(min(chunk, d_sae - a), d_sae, dtype=sae.dtype, device=sae.device)
        eye[torch.arange(len(eye)), torch.arange(a, a + len(eye))] = 1
        rows.append(sae.decode(eye) - zero)
    return torch.cat(rows, 0)


def unembed_directions(model: Any, directions: Tensor) -> Tensor:
    """``[m, d_vocab]``: the direct logit effect of adding each residual direction.

    Final-norm convention: TransformerLens computes logits = norm(x) @ W_U + b_U. For RMSNorm,
    norm(x) = x / RMS(x) * w: the weight w is applied here (with mechflow's ``fold_ln`` it is
    already folded into W_U, and `ln_final` has no weight); the division by RMS(x) is not,
    since it depends on the token the feature fires on. That factor is one positive scalar per
    token, so it rescales all of a feature's logit effects equally: the promoted / suppressed
    rankings are exact and the values are in logits per unit activation at RMS(x) = 1, and the
    change of RMS(x) caused by the feature itself (second order) is ignored. LayerNorm models
    also centre x, a linear projection, which is applied. b_U is the same for every feature and
    left out; a final logit soft-cap (monotone) would not change the rankings either.
    """
    d = directions.to(model.W_U.dtype)
    if model.cfg.normalization_type in ("LN", "LNPre"):
        d = d - d.mean(-1, keepdim=True)
    w = getattr(model.ln_final, "w", None) if hasattr(model, "ln_final") else None
    if w is not None:
        d = d * w
    return d @ model.W_U


@torch.no_grad()
def logit_effects(model: Any, decoder: Tensor, features: Sequence[int], n: int, chunk: int = 256
                  ) -> dict[int, dict[str, list[tuple[int, float]]]]:
    """Top-`n` promoted and suppressed tokens of each latent in `features` (token id, logit effect)."""
    out: dict[int, dict[str, list[tuple[int, float]]]] = {}
    feats = list(features)
    for a in range(0, len(feats), chunk):
        part = feats[a:a + chunk]
        eff = unembed_directions(model, decoder[part])
        k = min(n, eff.shape[1])
        top = eff.topk(k, dim=1)
        bottom = (-eff).topk(k, dim=1)
        for j, f in enumerate(part):
            out[f] = {"promoted": list(zip(top.indices[j].tolist(), top.values[j].double().tolist())),
                      "suppressed": list(zip(bottom.indices[j].tolist(), (-bottom.values[j]).double().tolist()))}
    return out


# ----------------------------------------------------------------------------- 3-4. attribution


@dataclass
class SplicedSAE:
    """A model with an SAE spliced in at `hook`, positions >= `start` (BOS excluded when start = 1).

    With `error_term` the hook's output is x + (decode(a') - decode(a)): the model's own
    activation plus what the latent edit changes, so an unedited spliced model is the model
    itself. Without it the hook outputs decode(a') (the SAE reconstruction replaces x).
    """

    model: Any
    sae: Any
    hook: str
    start: int
    decoder: Tensor  # effective decoder [d_sae, d_in] in the model's dtype
    error_term: bool = True

    @classmethod
    def build(cls, model: Any, sae: Any, hook: str, start: int, error_term: bool = True) -> SplicedSAE:
        if hook not in model.hook_dict:
            raise ConfigError(f"hook {hook!r} of the SAE is not a hook of the model ({model.cfg.model_name}); "
                              "train the SAE on this model's harvest")
        return cls(model, sae, hook, start, effective_decoder(sae).to(model.cfg.dtype), error_term)

    @torch.no_grad()
    def latents(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """The hook's activation ``[n, pos, d]`` on `tokens` and the SAE latents ``[n, pos - start, d_sae]``."""
        from mechflow.harvest.hooks import stop_layer

        _, cache = self.model.run_with_cache(tokens, names_filter=[self.hook],
                                             stop_at_layer=stop_layer([self.hook], self.model.cfg.n_layers))
        act = cache[self.hook]
        if act.dim() != 3 or act.shape[:2] != tokens.shape:
            raise ConfigError(f"hook {self.hook!r} has shape {tuple(act.shape)}, not [batch, pos, d]")
        if act.shape[-1] != self.sae.cfg.d_in:
            raise ConfigError(f"the SAE has d_in={self.sae.cfg.d_in} but hook {self.hook!r} of the model has width "
                              f"{act.shape[-1]}: the SAE was trained on another model or hook; retrain it on "
                              "this run's harvest")
        lat = self.sae.encode(act[:, self.start:].to(self.sae.dtype))
        if lat.is_sparse:
            lat = lat.to_dense()
        return act, lat.to(act.dtype)

    def reconstruction(self, latents: Tensor) -> Tensor:
        return (latents.to(self.decoder.dtype) @ self.decoder
                + self.sae.decode(torch.zeros(1, self.decoder.shape[0], dtype=self.sae.dtype)).to(self.decoder.dtype))

    def run(self, tokens: Tensor, recon: Tensor | None = None, delta: Tensor | None = None,
            keep_grad: bool = False) -> tuple[Tensor, Tensor | None]:
        """Logits of the spliced model; `delta` ``[n, pos - start, d]`` is added at the hook.

        `recon` is the SAE reconstruction of the clean activation (needed without the error
        term). With `keep_grad` the hook's (edited) output is returned as an autograd leaf.
        """
        if not self.error_term and recon is None:
            raise ValueError("SplicedSAE.run needs recon when error_term is False")
        store: dict[str, Tensor] = {}

        def hook_fn(act: Tensor, hook: Any = None) -> Tensor:
            tail = act[:, self.start:] if self.error_term else recon.to(act.dtype)
            if delta is not None:
                tail = tail + delta.to(act.dtype)
            if keep_grad:
                tail = tail.detach().requires_grad_(True)
                store["x"] = tail
            return torch.cat([act[:, :self.start], tail], 1)

        logits = self.model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(self.hook, hook_fn)])
        return logits, store.get("x")


@dataclass
class FeatureAttribution:
    """Attribution of every latent for one batch of prompt pairs.

    Attributes:
        per_prompt: ``[n, d_sae]`` (a_clean - a_target) . dm/da summed over positions.
        lat_clean / lat_target: ``[n, pos - start, d_sae]`` latents and the values they are patched to.
        m_model / m_spliced / m_corrupted: ``[n]`` metric of the model, of the spliced model on
            the clean prompts, and of the model on the corrupted prompts.
        recon: SAE reconstruction of the clean activation (used without the error term).
    """

    per_prompt: Tensor
    lat_clean: Tensor
    lat_target: Tensor
    m_model: Tensor
    m_spliced: Tensor
    m_corrupted: Tensor
    recon: Tensor

    @property
    def mean(self) -> Tensor:
        return self.per_prompt.mean(0)


def feature_attribution(spliced: SplicedSAE, batch: Any, ablation: str = "corrupted") -> FeatureAttribution:
    """Attribution patching of every latent in one forward and one backward pass (module step 3)."""
    if ablation not in ("corrupted", "zero"):
        raise ConfigError(f"sae.features.ablation: {ablation!r} is not 'corrupted' or 'zero'")
    _, lat_c = spliced.latents(batch.clean_tokens)
    if ablation == "corrupted":
        _, lat_t = spliced.latents(batch.corrupted_tokens)
    else:
        lat_t = torch.zeros_like(lat_c)
    recon = spliced.reconstruction(lat_c)
    with torch.enable_grad():
        logits, x = spliced.run(batch.clean_tokens, recon, keep_grad=True)
        m = batch.metric(logits)
        (grad,) = torch.autograd.grad(m.sum(), x)
    grad_lat = grad @ spliced.decoder.T  # dm/da_i = W_dec[i] . dm/dx
    per_prompt = ((lat_c - lat_t) * grad_lat).sum(1)
    with torch.no_grad():
        m_model = batch.metric(spliced.model(batch.clean_tokens, return_type="logits"))
        m_corr = batch.metric(spliced.model(batch.corrupted_tokens, return_type="logits"))
    return FeatureAttribution(per_prompt.detach(), lat_c, lat_t, m_model.detach(), m.detach(), m_corr.detach(),
                              recon)


@torch.no_grad()
def ablation_effects(spliced: SplicedSAE, batch: Any, fa: FeatureAttribution, feature_sets: Sequence[Sequence[int]],
                     alpha: float = 1.0, max_batch: int = 64, progress: bool = False) -> Tensor:
    """Exact m(spliced) - m(edited) per prompt, ``[len(feature_sets), n]`` (module step 4).

    In each edit the latents of one set move `alpha` of the way from their clean values to
    their targets (alpha = 1: patched to the corrupted value / zero) at every position
    >= start; the rest of the model is recomputed. Several sets share a forward (stacked batch).
    """
    n = len(batch)
    copies = max(1, max_batch // n)
    diff = fa.lat_target - fa.lat_clean
    out = []
    for a in tqdm(range(0, len(feature_sets), copies), desc="exact ablation", disable=not progress):
        chunk = [list(s) for s in feature_sets[a:a + copies]]
        delta = torch.cat([alpha * (diff[:, :, s] @ spliced.decoder[s]) for s in chunk], 0)
        tokens = batch.clean_tokens.repeat(len(chunk), 1)
        logits, _ = spliced.run(tokens, fa.recon.repeat(len(chunk), 1, 1), delta)
        for j in range(len(chunk)):
            out.append(fa.m_spliced - batch.metric(logits[j * n:(j + 1) * n]))
    return torch.stack(out) if out else torch.zeros(0, n, dtype=fa.m_spliced.dtype)


def agreement(attribution: Sequence[float], exact: Sequence[float]) -> dict[str, Any]:
    """How well attribution predicts the exact ablation effect over the verified latents."""
    from scipy import stats as sps

    a, e = np.asarray(attribution, dtype=np.float64), np.asarray(exact, dtype=np.float64)
    out: dict[str, Any] = {"n": len(a)}
    if len(a) == 0:
        return out
    err = np.abs(a - e)
    out.update({"max_abs_error": float(err.max()), "mean_abs_error": float(err.mean()),
                "relative_error": float(err.sum() / max(np.abs(e).sum(), 1e-30)),
                "sign_agreement": float(np.mean(np.sign(a) == np.sign(e)))})
    varied = len(a) >= 2 and np.ptp(a) > 0 and np.ptp(e) > 0
    out["pearson"] = float(sps.pearsonr(a, e).statistic) if varied else None
    out["spearman"] = float(sps.spearmanr(a, e).statistic) if varied else None
    return out


def _task_analysis(spliced: SplicedSAE, name: str, dataset: Path, c: FeaturesConfig) -> tuple[dict, pl.DataFrame]:
    """Attribution, exact verification and their agreement for one task."""
    from mechflow.tasks import TaskDataset, select_batch

    ds = TaskDataset.load(dataset)
    if not ds.posable or not ds.examples:
        log.warning("task %s: no examples (%s); no feature attribution", name, ds.reason or "empty dataset")
        return {"task": name, "skipped": ds.reason or "empty dataset"}, pl.DataFrame()
    batch = select_batch(ds, c.n_prompts, dataset)
    fa = feature_attribution(spliced, batch, c.ablation)
    mean = fa.mean.double()
    order = torch.argsort(mean.abs(), descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(order) + 1)
    verify = [int(i) for i in order[:c.n_verify] if float(mean[i]) != 0.0]
    exact = torch.full_like(mean, float("nan"))
    result: dict[str, Any] = {
        "task": name, "metric": ds.metric_kind, "n_prompts": len(batch), "ablation": c.ablation,
        "error_term": c.error_term, "m_model": float(fa.m_model.mean()), "m_spliced": float(fa.m_spliced.mean()),
        "m_corrupted": float(fa.m_corrupted.mean()), "total_attribution": float(mean.sum())}
    if verify:
        effects = ablation_effects(spliced, batch, fa, [[i] for i in verify] + [verify], max_batch=c.max_batch,
                                   progress=True).double().mean(1)
        exact[verify] = effects[:-1]
        result["agreement"] = agreement(mean[verify].tolist(), effects[:-1].tolist())
        result["joint"] = {"features": verify, "sum_attribution": float(mean[verify].sum()),
                           "exact_effect": float(effects[-1])}
        result["top"] = [{"feature": i, "attribution": float(mean[i]), "exact_effect": float(exact[i])}
                         for i in verify]
        log.info("task %s: attribution vs exact ablation over top %d latents: %s", name, len(verify),
                 result["agreement"])
    frame = pl.DataFrame({
        "task": [name] * len(mean), "feature": pl.Series(range(len(mean)), dtype=pl.Int32),
        "attribution": mean.tolist(), "attribution_std": fa.per_prompt.double().std(0).nan_to_num(0.0).tolist(),
        "rank": pl.Series(rank.tolist(), dtype=pl.Int32),
        "clean_activation": fa.lat_clean.double().sum(1).mean(0).tolist(),
        "target_activation": fa.lat_target.double().sum(1).mean(0).tolist(),
        "verified": [bool(x) for x in ~torch.isnan(exact)],
        "exact_effect": [None if math.isnan(v) else v for v in exact.tolist()]})
    return result, frame


# ----------------------------------------------------------------------------- 5. records


def read_windows(tokens: Path, context_ids: set[int], batch_rows: int = 1024) -> dict[int, list[int]]:
    """Token ids of the wanted contexts of the corpus `tokens.parquet`, reading it in row batches."""
    tokens = Path(tokens)
    if not tokens.exists():
        raise DataError(f"corpus tokens file {tokens} does not exist: re-run the prepare_corpus stage")
    out: dict[int, list[int]] = {}
    if not context_ids:
        return out
    wanted = np.array(sorted(context_ids), dtype=np.int64)
    pf = pq.ParquetFile(tokens)
    for rb in pf.iter_batches(batch_size=batch_rows, columns=["context_id", "tokens"]):
        mask = pc.is_in(rb.column(0), value_set=pc.cast(wanted, rb.column(0).type))
        if not pc.any(mask).as_py():
            continue
        sel = rb.filter(mask)
        for c, t in zip(sel.column(0).to_pylist(), sel.column(1).to_pylist()):
            out[int(c)] = t
    pf.close()
    missing = sorted(context_ids - set(out))
    if missing:
        raise DataError(f"contexts {missing[:5]} of the harvest are not in {tokens}: the corpus and the harvest "
                        "do not match; re-run the harvest on this corpus")
    return out


def token_decoder(tokenizer: Any) -> Callable[[int], str]:
    """id -> text of that one token (cached); `<id>` when no tokenizer is available."""
    cache: dict[int, str] = {}

    def decode(i: int) -> str:
        if i not in cache:
            cache[i] = tokenizer.decode([i]) if tokenizer is not None else f"<{i}>"
        return cache[i]

    return decode


def select_features(stats: FeatureStats, c: FeaturesConfig, always: Sequence[int]) -> list[int]:
    """`always` (the top attributed latents) plus `n_features` live latents (random or most frequent)."""
    live = torch.nonzero(stats.live).flatten().tolist()
    chosen = set(always)
    budget = len(live) if c.n_features is None else max(c.n_features - len(chosen), 0)
    rest = [f for f in live if f not in chosen]
    if c.selection == "frequency":
        rest.sort(key=lambda f: (-int(stats.count[f]), f))
    else:
        rest = [rest[i] for i in np.random.default_rng(c.seed).permutation(len(rest))]
    return sorted(chosen | set(rest[:budget]))


def build_records(stats: FeatureStats, features: Sequence[int], windows: dict[int, list[int]], window: int,
                  decode: Callable[[int], str], logits: dict[int, dict] | None, task_frames: dict[str, pl.DataFrame],
                  base: dict[str, Any]) -> list[dict[str, Any]]:
    """One JSON-ready record per latent (see the module docstring, step 5)."""
    per_task = {t: f.sort("feature") for t, f in task_frames.items() if len(f)}
    records = []
    for f in features:
        contexts = []
        for r, (v, cid, p) in enumerate(stats.top_contexts(f)):
            ids = windows[cid]
            lo, hi = max(0, p - window), min(len(ids), p + window + 1)
            contexts.append({"rank": r, "activation": v, "context_id": cid, "position": p, "token_id": int(ids[p]),
                             "token": decode(int(ids[p])), "left": [decode(int(i)) for i in ids[lo:p]],
                             "right": [decode(int(i)) for i in ids[p + 1:hi]],
                             "left_ids": [int(i) for i in ids[lo:p]], "right_ids": [int(i) for i in ids[p + 1:hi]]})
        effects = None
        if logits is not None:
            effects = {k: [{"token_id": t, "token": decode(t), "value": v} for t, v in logits[f][k]]
                       for k in ("promoted", "suppressed")}
        attribution = {}
        for t, frame in per_task.items():
            row = frame.row(f, named=True)
            attribution[t] = {"attribution": row["attribution"], "rank": row["rank"], "verified": row["verified"],
                              "exact_effect": row["exact_effect"]}
        records.append({"feature": int(f), **base, "stats": stats.feature_stats(f), "top_contexts": contexts,
                        "logit_effects": effects, "task_attribution": attribution})
    return records


# ----------------------------------------------------------------------------- 6. outputs


def plot_histograms(stats: FeatureStats, features: Sequence[int], path: Path, title: str) -> None:
    """Firing frequency over latents, pooled activation values, and a few latents' own distributions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(HIST_LOG10_LO, HIST_LOG10_HI, N_HIST_BINS + 1)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    freq = stats.frequency.numpy()
    live = freq > 0
    ax = axes[0]
    if live.any():
        ax.hist(np.log10(freq[live]), bins=40, color="tab:blue")
    ax.set_title(f"firing frequency ({int((~live).sum())} of {len(freq)} latents never fire)")
    ax.set_xlabel("log10 fraction of tokens")
    ax.set_ylabel("latents")
    pooled = stats.hist.sum(0).numpy()
    axes[1].stairs(pooled, edges, fill=True, color="tab:orange")
    axes[1].set_title(f"activation values (non-zero, {stats.n_tokens:,} tokens)")
    axes[1].set_xlabel("log10 activation")
    axes[1].set_ylabel("count")
    for f in list(features)[:6]:
        counts = stats.hist[f].numpy()
        if counts.sum():
            axes[2].stairs(counts / counts.sum(), edges, label=f"#{f}")
    axes[2].set_title("activation distribution of recorded latents")
    axes[2].set_xlabel("log10 activation")
    axes[2].set_ylabel("fraction of firings")
    if axes[2].get_legend_handles_labels()[0]:
        axes[2].legend(fontsize=8)
    filled = np.nonzero(pooled)[0]
    if len(filled):  # show the populated decades only
        lo, hi = edges[max(filled[0] - 2, 0)], edges[min(filled[-1] + 3, N_HIST_BINS)]
        axes[1].set_xlim(lo, hi)
        axes[2].set_xlim(lo, hi)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def write_jsonl(records: Sequence[dict[str, Any]], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(to_json(rec, indent=None) + "\n" for rec in records)


def _e(text: Any) -> str:
    """HTML-escaped text with newlines and tabs made visible (token strings)."""
    return html.escape(str(text), quote=True).replace("\n", "\u21b5").replace("\t", "\u21e5")


def _num(v: Any, fmt: str = ".4g") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _svg_hist(counts: Sequence[int], width: int = 160, height: int = 36) -> str:
    total = max(max(counts), 1)
    bw = width / len(counts)
    bars = "".join(f'<rect x="{i * bw:.1f}" y="{height - height * c / total:.1f}" width="{bw:.1f}" '
                   f'height="{height * c / total:.1f}"/>' for i, c in enumerate(counts) if c)
    return (f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label="log10 activation histogram">{bars}</svg>')


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}
.feat{border:1px solid #bbb;border-radius:6px;padding:.6em 1em;margin:1em 0}
.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap;font-size:12px}
mark{background:#fc6;font-weight:bold}.pos{color:#060}.neg{color:#a00}
.tok{font-family:ui-monospace,monospace;background:#f3f3f3;padding:0 2px;margin:1px;white-space:pre}
svg.hist rect{fill:#4a7ab5}.muted{color:#777;font-size:12px}
"""


def render_html(records: Sequence[dict[str, Any]], summary: dict[str, Any], figure_png: bytes | None) -> str:
    """One self-contained page: summary, task attribution tables, one card per latent (all text escaped)."""
    s = summary
    parts = [(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>SAE features: {_e(s['hook'])}</title>"
             f"<style>{_CSS}</style></head><body>"),
             f"<h1>SAE features · {_e(s['model'])} · {_e(s['hook'])}</h1>",
             (f"<p>{_e(s['architecture'])} SAE, d_in {s['d_in']}, d_sae {s['d_sae']} "
             f"(<code>{_e(s['dictionary'])}</code>). "
             f"Statistics over {s['n_tokens']:,} harvest tokens; {s['n_live']} latents fire, {s['n_dead']} never do. "
             f"{len(records)} latents recorded.</p>")]
    if figure_png:
        parts.append(f"<img alt='activation histograms' style='max-width:100%' "
                     f"src='data:image/png;base64,{base64.b64encode(figure_png).decode()}'>")
    for t in s["tasks"]:
        parts.append(f"<h2>Task attribution: {_e(t['task'])}</h2>")
        if "skipped" in t:
            parts.append(f"<p>skipped: {_e(t['skipped'])}</p>")
            continue
        parts.append(f"<p>{t['n_prompts']} prompt pairs, metric {_e(t['metric'])}: model {_num(t['m_model'])}, "
                     f"spliced {_num(t['m_spliced'])}, corrupted {_num(t['m_corrupted'])}. Attribution = "
                     f"(a<sub>clean</sub> − a<sub>{_e(t['ablation'])}</sub>) · ∂m/∂a; exact effect = "
                     f"m(spliced) − m(latent patched), error term {'kept' if t['error_term'] else 'dropped'}.</p>")
        ag = t.get("agreement")
        if ag:
            joint = t["joint"]
            parts.append(f"<table><tr><th>verified</th><th>Pearson</th><th>Spearman</th><th>sign agreement</th>"
                         f"<th>max |error|</th><th>joint: Σ attribution</th><th>joint: exact</th></tr><tr>"
                         f"<td>{ag['n']}</td><td>{_num(ag.get('pearson'), '.3f')}</td>"
                         f"<td>{_num(ag.get('spearman'), '.3f')}</td><td>{_num(ag['sign_agreement'], '.2f')}</td>"
                         f"<td>{_num(ag['max_abs_error'])}</td><td>{_num(joint['sum_attribution'])}</td>"
                         f"<td>{_num(joint['exact_effect'])}</td></tr></table>")
            rows = "".join(f"<tr><td><a href='#f{r['feature']}'>#{r['feature']}</a></td>"
                           f"<td>{_num(r['attribution'])}</td><td>{_num(r['exact_effect'])}</td></tr>"
                           for r in t["top"])
            parts.append(f"<table><tr><th>latent</th><th>attribution</th><th>exact effect</th></tr>{rows}</table>")
    parts.append("<h2>Latents</h2>")
    for rec in records:
        st = rec["stats"]
        parts.append(f"<div class='feat' id='f{rec['feature']}'><h3>#{rec['feature']}</h3>"
                     f"<p>fires on {_num(100 * st['frequency'], '.3g')}% of tokens ({st['n_active']:,}); mean when "
                     f"active {_num(st['mean_active'])}, max {_num(st['max'])} {_svg_hist(st['hist']['counts'])}"
                     f"<span class='muted'> log10 activation {st['hist']['log10_lo']:g}…{st['hist']['log10_hi']:g}"
                     "</span></p>")
        if rec["task_attribution"]:
            items = "; ".join(f"{_e(t)}: {_num(v['attribution'])} (rank {v['rank']}"
                              + (f", exact {_num(v['exact_effect'])}" if v["verified"] else "") + ")"
                              for t, v in rec["task_attribution"].items())
            parts.append(f"<p>task attribution — {items}</p>")
        if rec["logit_effects"]:
            for kind, cls in (("promoted", "pos"), ("suppressed", "neg")):
                toks = "".join(f"<span class='tok' title='{_num(x['value'])}'>{_e(x['token'])}</span>"
                               for x in rec["logit_effects"][kind])
                parts.append(f"<p><span class='{cls}'>{kind}</span>: {toks}</p>")
        if rec["top_contexts"]:
            rows = "".join(f"<tr><td>{_num(c['activation'])}</td><td class='ctx'>{_e(''.join(c['left']))}"
                           f"<mark>{_e(c['token'])}</mark>{_e(''.join(c['right']))}</td></tr>"
                           for c in rec["top_contexts"])
            parts.append(f"<table><tr><th>activation</th><th>context</th></tr>{rows}</table>")
        parts.append("</div>")
    parts.append("</body></html>\n")
    return "".join(parts)


# ----------------------------------------------------------------------------- the stage


def _load_dictionary(dictionary: Path) -> Any:
    from mechflow.dictionaries.sae import load_sae

    dictionary = Path(dictionary)
    if not (dictionary / "cfg.json").is_file():
        raise DataError(f"SAE folder {dictionary} does not exist or has no cfg.json: run the train_sae stage "
                        "(or point sae_features at a SAELens folder)")
    sae = load_sae(dictionary)
    sae.eval()
    check_sae(sae, dictionary)
    return sae


def _features_cfg(cfg: Any) -> tuple[FeaturesConfig, SAEConfig | None]:
    if isinstance(cfg, FeaturesConfig):
        return cfg, None
    full = parse_config(SAEConfig, cfg, "sae")
    return full.features, full


def _task_datasets(tasks: Sequence[str], datasets: Sequence[Path] | Path | None) -> dict[str, Path]:
    if datasets is None:
        datasets = []
    if isinstance(datasets, (str, Path)):
        datasets = [datasets]
    by_name = {Path(p).parent.name: Path(p) for p in datasets}
    unknown = [t for t in tasks if t not in by_name]
    if unknown:
        raise ConfigError(f"sae.features.tasks: {unknown} are not tasks of this run (it has {sorted(by_name)}); "
                          "select them in `task` (e.g. task=[ioi,...]) or remove them from sae.features.tasks")
    return {t: by_name[t] for t in tasks}


def feature_analysis(cfg: Any, *, dictionary: Path, manifest: Path, tokens: Path, features: Path, html: Path,
                     histograms: Path, attribution: Path, summary: Path, datasets: Sequence[Path] | None = None,
                     model_cfg: dict | None = None, model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Stage function of rule `feature_analysis` (steps 1-6 of the module docstring).

    Args:
        cfg: the `sae` config group (its `features` key), or a `FeaturesConfig`.
        dictionary: the SAELens folder written by `train_sae`.
        manifest: harvest `_manifest.json` of the SAE's hook.
        tokens: the corpus `tokens.parquet` the harvest ran on.
        features, html, histograms, attribution, summary: output paths (JSONL, HTML, PNG, Parquet, JSON).
        datasets: `tasks/<task>/dataset.jsonl` of (at least) the tasks in `sae.features.tasks`.
        model_cfg: the `model` group; `model` / `tokenizer`: already loaded ones (tests).
    """
    c, full = _features_cfg(cfg)
    task_paths = _task_datasets(c.tasks, datasets)
    dictionary = Path(dictionary)
    sae = _load_dictionary(dictionary)
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
    training_file = dictionary / "training.json"
    training = (load_document(training_file, DictionaryTraining, fix="re-run train_sae", partial=True)
                if training_file.exists() else {})
    exclude_bos = bool(training.get("exclude_bos", full.data.exclude_bos if full else True))
    verify = full.data.verify_sha256 if full else True
    source = ShardSource([mfile], exclude_bos=exclude_bos, verify_sha256=verify)
    start = 1 if source.exclude_bos else 0

    encode_dtype = sae.dtype
    stats = stream_feature_stats(lambda x: sae.encode(x.to(encode_dtype)), source, d_sae=sae.cfg.d_sae,
                                 k=c.top_contexts, batch_rows=c.batch_rows, max_tokens=c.max_tokens)
    source.close()
    log.info("feature stats over %d tokens: %d of %d latents fire", stats.n_tokens, int(stats.live.sum()),
             sae.cfg.d_sae)

    if model is None:
        from mechflow.models import load_model_from_cfg

        if not model_cfg:
            raise ConfigError("feature_analysis needs model_cfg (the `model` group) to load the model")
        loaded = load_model_from_cfg(model_cfg)
        model = loaded.model
        tokenizer = loaded.tokenizer if tokenizer is None else tokenizer
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    spliced = SplicedSAE.build(model, sae, man.hook, start, c.error_term)

    task_results, task_frames = [], {}
    for name, path in task_paths.items():
        res, frame = _task_analysis(spliced, name, path, c)
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

    result = {"stage": "feature_analysis", **base, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
              "config": c.model_dump(mode="json"), "exclude_bos": source.exclude_bos, "n_tokens": stats.n_tokens,
              "n_live": int(stats.live.sum()), "n_dead": int((~stats.live).sum()),
              "dead_fraction": float((~stats.live).double().mean()), "n_records": len(records),
              "logit_effects": residual, "hist_log10_range": [HIST_LOG10_LO, HIST_LOG10_HI],
              "hist_bins_per_decade": HIST_BINS_PER_DECADE, "tasks": task_results}
    for t in task_results:
        for key in ("pearson", "spearman", "sign_agreement"):
            value = (t.get("agreement") or {}).get(key)
            if value is not None:
                result[f"{t['task']}_{key}"] = value

    frames = [f for f in task_frames.values() if len(f)]
    with atomic_path(attribution) as tmp:
        (pl.concat(frames) if frames else pl.DataFrame(schema={"task": pl.Utf8, "feature": pl.Int32})
         ).write_parquet(tmp, compression="zstd")
    plot_histograms(stats, always or chosen, Path(histograms),
                    f"{man.model} {man.hook}: {sae.cfg.architecture()} SAE, d_sae {sae.cfg.d_sae}")
    write_jsonl(records, Path(features))
    atomic_write_text(html, render_html(records, result, Path(histograms).read_bytes()))
    write_document(summary, FeatureSummary, result)
    log.info("feature analysis: %d records -> %s", len(records), features)
    return result
