"""Step 2 of the `features` stage: what each latent writes, as direct logit effects.

After Bricken et al. (2023, "Towards Monosemanticity") and Neuronpedia's logit weights: each
latent's decoder direction times the unembedding, through the model's final norm as
`unembed_directions` documents (RMSNorm: its weight is applied, its 1/RMS(x) is not). Direct
path only: the blocks after the hook are skipped. Cross-model matching reuses these functions for
its logit-effect profiles (`mechflow.features.profiles`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


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
