"""Data-driven initial JumpReLU thresholds: start training at a chosen L0.

Why: the L0 penalty reaches a JumpReLU only through its thresholds (straight-through
estimator), and Adam moves a parameter by at most about `lr` per step whatever the size of
its gradient. A threshold that starts at 0.01 can therefore rise by at most ~`lr x steps`
(0.16 in a 400-step CPU run at lr 4e-4), far less than the pre-activation scale, so in a
short run the initial threshold, not the penalty coefficient, sets L0 (measured: L0 1,388
at coefficient 1 and 1,031 at coefficient 10, with d_sae 4608). Placing every latent's
threshold at the quantile of its own pre-activations that makes it fire on
`target_l0 / d_sae` of the rows starts training at L0 = `target_l0` with no latent dead at
step 0. That alone does not hold L0: while the encoder grows (the decoder starts small), the
pre-activations outrun thresholds that move ~lr per step (measured: L0 48 -> ~1,000 within 100
steps), so the thresholds also get their own learning rate (`jumprelu_threshold_lr_scale`,
`threshold_lr_scale`; `mechflow.dictionaries.sae.give_thresholds_their_own_lr`).
"""

from __future__ import annotations

import torch

from mechflow.errors import ConfigError


@torch.no_grad()
def quantile_thresholds(pre_acts: torch.Tensor, target_l0: float, field: str) -> torch.Tensor:
    """Per-latent thresholds from pre-activations ``[N, ..., d_sae]``; returns ``[..., d_sae]``.

    Latent j's threshold is the value above which exactly ``round(N * target_l0 / d_sae)`` of
    its N pre-activations lie (ties aside), clamped at 0 (a negative threshold would let
    negative pre-activations through). So each latent fires on ``target_l0 / d_sae`` of the
    rows and the mean number of active latents per row is ``target_l0``.

    Raises:
        ConfigError: `target_l0` is not in (0, d_sae) or N is too small to resolve it (names `field`).
    """
    n, d_sae = pre_acts.shape[0], pre_acts.shape[-1]
    if not 0 < target_l0 < d_sae:
        raise ConfigError(f"{field}={target_l0} must lie strictly between 0 and d_sae={d_sae}")
    above = round(n * target_l0 / d_sae)
    if above < 1:
        raise ConfigError(f"{field}={target_l0}: {n} initialisation rows are too few to place a threshold "
                          f"at a firing rate of {target_l0 / d_sae:.2g}; raise n_batches_for_norm_estimate "
                          "or the batch size")
    kth = torch.kthvalue(pre_acts.float(), n - above, dim=0).values
    return kth.clamp(min=0.0)


def threshold_param_groups(params, threshold: torch.Tensor, lr: float, scale: float) -> list[dict]:
    """Adam param groups: every parameter at `lr`, the JumpReLU `threshold` at ``lr * scale``."""
    others = [p for p in params if p is not threshold]
    return [{"params": others}, {"params": [threshold], "lr": lr * scale}]
