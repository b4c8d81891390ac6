"""Steps 3-4 of the `features` stage: what each latent does for a task, verified by exact ablation.

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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechflow.errors import ConfigError
from mechflow.features.config import FeaturesConfig
from mechflow.features.logits import effective_decoder

log = logging.getLogger(__name__)


def check_sae(sae: Any, where: Path | str) -> None:
    """Refuse dictionaries whose decoder is not one fixed affine map (so latents can be patched)."""
    if hasattr(sae.cfg, "d_out"):
        raise ConfigError(f"{where} is a transcoder; the features stages read SAE folders (rule train_sae)")
    norm = getattr(sae.cfg, "normalize_activations", "none")
    if norm in ("constant_norm_rescale", "layer_norm"):
        raise ConfigError(f"{where}: normalize_activations={norm!r} rescales the decoder output per token, so a "
                          "latent has no fixed decoder direction; fold the normalisation into the weights first")
    if getattr(sae.cfg, "reshape_activations", "none") == "hook_z":
        raise ConfigError(f"{where}: hook_z SAEs are not supported by the features stages (train on a residual hook)")


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
        raise ConfigError(f"features.ablation: {ablation!r} is not 'corrupted' or 'zero'")
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


def analyse_task(spliced: SplicedSAE, name: str, dataset: Path, c: FeaturesConfig) -> tuple[dict, pl.DataFrame]:
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
