"""Step 1 of the `features` stage: one streaming pass over the harvest of the SAE's hook.

Every shard (non-BOS rows when the SAE was trained without BOS) is read in batches of
`batch_rows`; each batch is encoded and, per latent, a running top-k of activations with their
(context_id, position), the firing count, sums, the maximum and a histogram of log10(activation)
over fixed bins are kept. Memory: one batch of latents plus O(d_sae x top_contexts); nothing else
is held.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechflow.dictionaries.data import ShardSource
from mechflow.errors import ConfigError, DataError

# log10(activation) histogram bins shared by every latent: 1e-4 .. 1e4, 10 bins per decade.
# Values outside the range fall into the first / last bin (counted, never dropped).
HIST_LOG10_LO, HIST_LOG10_HI, HIST_BINS_PER_DECADE = -4.0, 4.0, 10
N_HIST_BINS = int((HIST_LOG10_HI - HIST_LOG10_LO) * HIST_BINS_PER_DECADE)


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


class FeatureStatsAccumulator:
    """Running per-latent statistics (`FeatureStats`) fed batch by batch: `add` a ``[rows, d_sae]``
    batch of latents with each row's (context_id, position), then `result`. Shared by the harvest
    pass of the `features` stage (`stream_feature_stats`) and the transcoder set's pass over the
    corpus (`mechflow.features.transcoders`, one accumulator per layer).

    Works on the non-zero entries only (L0 per token, not d_sae), so the bookkeeping costs a small
    fraction of the encoder's matmul.
    """

    def __init__(self, d_sae: int, k: int):
        self.d_sae, self.k, self.n = d_sae, k, 0
        self.count = torch.zeros(d_sae, dtype=torch.long)
        self.total = torch.zeros(d_sae, dtype=torch.float64)
        self.total_sq = torch.zeros(d_sae, dtype=torch.float64)
        self.hist = torch.zeros(d_sae * N_HIST_BINS, dtype=torch.long)
        self.top: tuple[Tensor, Tensor, Tensor] | None = None
        self.vmax: Tensor | None = None

    @torch.no_grad()
    def add(self, lat: Tensor, ctx: Tensor, pos: Tensor) -> None:
        """One batch: latents ``[rows, d_sae]``, the rows' context ids and positions ``[rows]``."""
        if lat.is_sparse:
            lat = lat.to_dense()
        if lat.shape[1] != self.d_sae:
            raise ConfigError(f"the dictionary returned {lat.shape[1]} latents per row, expected d_sae={self.d_sae}")
        if self.top is None:
            self.top = (torch.zeros(self.k, self.d_sae, dtype=lat.dtype),
                        torch.full((self.k, self.d_sae), -1, dtype=torch.long),
                        torch.full((self.k, self.d_sae), -1, dtype=torch.long))
        self.n += len(lat)
        r, f = lat.nonzero(as_tuple=True)
        v = lat[r, f]
        v64 = v.double()
        self.count += torch.bincount(f, minlength=self.d_sae)
        self.total.index_add_(0, f, v64)
        self.total_sq.index_add_(0, f, v64 * v64)
        self.vmax = lat.amax(0) if self.vmax is None else torch.maximum(self.vmax, lat.amax(0))
        self.hist.index_add_(0, f * N_HIST_BINS + log10_bins(v), torch.ones_like(f))
        self.top = merge_top_k(self.top, f, v, ctx[r], pos[r], self.k)

    def result(self, what: str, fix: str) -> FeatureStats:
        """The statistics so far; `what` names the rows and `fix` the remedy in the error raised when
        there were none."""
        if self.top is None or self.vmax is None:
            raise DataError(f"{what} hold no usable rows for feature statistics; {fix}")
        return FeatureStats(n_tokens=self.n, top_values=self.top[0], top_context=self.top[1],
                            top_position=self.top[2], count=self.count, sum=self.total, sum_sq=self.total_sq,
                            max=self.vmax, hist=self.hist.view(self.d_sae, N_HIST_BINS))


@torch.no_grad()
def stream_feature_stats(encode: Callable[[Tensor], Tensor], source: ShardSource, *, d_sae: int, k: int,
                         batch_rows: int = 4096, max_tokens: int | None = None, progress: bool = True
                         ) -> FeatureStats:
    """One pass over `source`: running top-k contexts, firing counts and histograms of every latent.

    Args:
        encode: ``[rows, d_in] -> [rows, d_sae]`` latents (e.g. a SAELens ``sae.encode``).
        source: the harvest rows (BOS already dropped by the source when asked).
        k: contexts kept per latent.
    """
    acc = FeatureStatsAccumulator(d_sae, k)
    usable = source.n_rows - (sum(s.last_context - s.first_context + 1 for s in source.shards[0])
                              if source.exclude_bos else 0)
    expected = min(usable, max_tokens) if max_tokens else usable
    bar = tqdm(total=expected, desc="feature stats", unit="tok", disable=not progress)
    for rows, meta in source.iter_sequential(batch_rows, max_tokens):
        lat = encode(torch.from_numpy(rows))
        acc.add(lat, torch.from_numpy(meta[:, 0].astype(np.int64)), torch.from_numpy(meta[:, 1].astype(np.int64)))
        bar.update(len(rows))
    bar.close()
    return acc.result(f"harvest shards {source.shard_names}", "re-run the harvest stage")
