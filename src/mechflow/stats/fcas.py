"""FCAS: Functional Component Alignment Score between the circuits of two models.

Question: when two models solve the same task, do their most important components sit at
similar relative depths, do the same job, and push the answer in the same direction?

Definition (for models A and B, the same task, a size k):
    1. Each model gives one row per component c: an attribution score s_c (e.g. mean effect
       on the task metric), its layer l_c in a model with L layers, and a function label f_c
       (the head type from head typing, e.g. "name_mover", "induction", or "mlp" for MLPs).
    2. Relative depth uses the layer centre: d_c = (l_c + 0.5) / L, in (0, 1). The centre makes
       depth symmetric (first and last layer are equally far from the ends) and puts every
       component of layer l at the same depth whatever its sub-layer (attention or MLP).
    3. Top-k: the k components with the largest |s_c| (ties -> lower row index). Sign
       sigma_c = sign(s_c).
    4. Similarity of a in top-k(A) and b in top-k(B):
           sim(a, b) = (1 - |d_a - d_b|) * [f_a == f_b] * [sigma_a == sigma_b]
       in [0, 1] (the two indicator factors can be switched off: `match_function`, `match_sign`).
    5. FCAS = (1/k) * max over one-to-one matchings pi of sum_a sim(a, pi(a)), solved exactly by
       the Hungarian algorithm (`scipy.optimize.linear_sum_assignment`, maximize=True). FCAS is
       in [0, 1]: 1 iff every top component of A has a partner in B with the same function and
       sign at the same relative depth.

Significance by a permutation null (sampled, so the p-value and z refer to draws that can
reach the observed value; Phipson & Smyth 2010 for the +1):
    - null="shuffle_depth": within each model, permute the component -> depth assignment
      (labels, signs and the top-k set stay fixed). Tests whether depths align beyond what the
      functions and signs of the top components alone give. Exact (exchangeable) when depth is
      independent of (attribution, label) under H0.
    - null="random_sets": replace each model's top-k by a uniformly random k-subset of its
      components (with their own depth, label and sign). Tests whether the top components align
      better than random components of the same models.
    p = (1 + #{null >= observed}) / (1 + n_perm)  (valid, conservative);
    p_randomized = (#{null > observed} + U * (1 + #{null == observed})) / (1 + n_perm), U ~ U(0, 1),
    which is exactly uniform under H0 even though FCAS takes few distinct values (depths lie on
    a grid and many matchings score 0), so ties with the observed value are common;
    z = (observed - mean(null)) / std(null, ddof=1) from the sampled null (NaN if the null is
    constant).

Calibration (tests/unit/stats/test_fcas.py): on random models (300 seeds, 199 draws each),
p_randomized passes a KS test for uniformity for both nulls at k=3 and k=8. The conservative p
is valid but discrete: at k=3 the null has a few dozen distinct values, ties with the observed
score pile p above the uniform CDF and KS rejects it (p < 1e-20) although the test is valid;
so calibration is judged on p_randomized and validity of p by P(p <= alpha) <= alpha. Report
p (conservative) as the headline; p_randomized is for calibration studies and meta-analysis.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from mechflow.errors import DataError
from mechflow.stats.checks import as_rng, check_choice, check_positive_int, check_top_k, finite_array
from mechflow.stats.config import FCAS_NULLS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelComponents:
    """The scored components of one model on one task.

    Attributes:
        attribution: [m] attribution score per component.
        layer: [m] integer layer index in [0, n_layers).
        n_layers: number of layers of the model.
        label: [m] function label per component (str).
        names: optional [m] component names (e.g. "L5H3", "L7.mlp").
    """

    attribution: np.ndarray
    layer: np.ndarray
    n_layers: int
    label: np.ndarray
    names: list[str] | None = None

    def __post_init__(self) -> None:
        attr = finite_array("components.attribution", self.attribution, 1)
        layer = np.asarray(self.layer)
        label = np.asarray(self.label, dtype=object)
        if not isinstance(self.n_layers, (int, np.integer)) or self.n_layers < 1:
            raise DataError(f"components.n_layers: {self.n_layers!r} must be an integer >= 1")
        if layer.shape != attr.shape or label.shape != attr.shape:
            raise DataError(f"components: attribution, layer and label must have one entry per component; "
                            f"got shapes {attr.shape}, {layer.shape}, {label.shape}")
        if not np.issubdtype(layer.dtype, np.integer):
            if not np.all(np.isfinite(layer.astype(float))) or np.any(layer != np.round(layer)):
                raise DataError("components.layer: layers must be integers")
            layer = layer.astype(np.int64)
        if layer.size and (layer.min() < 0 or layer.max() >= self.n_layers):
            raise DataError(f"components.layer: values must lie in [0, {self.n_layers}), "
                            f"got [{layer.min()}, {layer.max()}]; check n_layers")
        if self.names is not None and len(self.names) != attr.size:
            raise DataError(f"components.names: {len(self.names)} names for {attr.size} components")
        object.__setattr__(self, "attribution", attr)
        object.__setattr__(self, "layer", layer.astype(np.int64))
        object.__setattr__(self, "label", label.astype(str))
        object.__setattr__(self, "n_layers", int(self.n_layers))

    @property
    def depth(self) -> np.ndarray:
        """[m] relative depth (layer + 0.5) / n_layers."""
        return (self.layer + 0.5) / self.n_layers

    @property
    def sign(self) -> np.ndarray:
        return np.sign(self.attribution)

    def __len__(self) -> int:
        return int(self.attribution.size)

    def top_k(self, k: int) -> np.ndarray:
        """Row indices of the k largest |attribution| (ties -> lower index), in rank order."""
        k = check_top_k("stats.top_k", k, len(self))
        return np.argsort(-np.abs(self.attribution), kind="stable")[:k]

    @classmethod
    def from_frame(cls, df: Any, n_layers: int, *, attribution: str = "score", layer: str = "layer",
                   label: str = "label", name: str | None = "component") -> "ModelComponents":
        """Build from a polars/pandas table with one row per component."""
        cols = list(df.columns)
        for field_, col in (("attribution", attribution), ("layer", layer), ("label", label)):
            if col not in cols:
                raise DataError(f"components table: missing column {col!r} ({field_}); columns are {cols}")
        names = [str(x) for x in df[name]] if name is not None and name in cols else None
        return cls(np.asarray(df[attribution], dtype=float), np.asarray(df[layer]), n_layers,
                   np.asarray(df[label]), names)


def similarity_matrix(
    depth_a: np.ndarray, label_a: np.ndarray, sign_a: np.ndarray,
    depth_b: np.ndarray, label_b: np.ndarray, sign_b: np.ndarray,
    *, match_function: bool = True, match_sign: bool = True,
) -> np.ndarray:
    """sim[..., i, j] = (1 - |d_a_i - d_b_j|) [f_a_i == f_b_j] [sigma_a_i == sigma_b_j].

    Inputs may carry leading batch axes (e.g. [n_perm, k]); the result is [..., k_a, k_b].
    """
    sim = 1.0 - np.abs(depth_a[..., :, None] - depth_b[..., None, :])
    if match_function:
        sim = sim * (label_a[..., :, None] == label_b[..., None, :])
    if match_sign:
        sim = sim * (sign_a[..., :, None] == sign_b[..., None, :])
    return sim


def _matching_score(sim: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    rows, cols = linear_sum_assignment(sim, maximize=True)
    return float(sim[rows, cols].sum() / sim.shape[0]), rows, cols


@dataclass(frozen=True)
class FCASResult:
    """Observed FCAS, its matching, and the sampled permutation null.

    Attributes:
        score: observed FCAS in [0, 1].
        k: top-k size.
        pairs: list of (index in A, index in B, similarity) for the optimal matching (row indices
            into each model's `ModelComponents`).
        null: [n_perm] FCAS under the null (empty if no test was run).
        null_kind: "shuffle_depth" or "random_sets".
        p_value: (1 + #{null >= score}) / (1 + n_perm).
        p_value_randomized: tie-randomized p-value, exactly uniform under H0.
        z: (score - mean(null)) / std(null, ddof=1).
    """

    score: float
    k: int
    pairs: list[tuple[int, int, float]]
    null: np.ndarray
    null_kind: str | None
    p_value: float
    p_value_randomized: float
    z: float

    def to_dict(self, a: ModelComponents | None = None, b: ModelComponents | None = None) -> dict[str, Any]:
        """JSON-ready summary (component names filled in when the models are given)."""
        def nm(model: ModelComponents | None, i: int) -> Any:
            return model.names[i] if model is not None and model.names is not None else i

        null = self.null
        return {
            "score": self.score, "k": self.k, "null_kind": self.null_kind,
            "n_permutations": int(null.size), "p_value": self.p_value,
            "p_value_randomized": self.p_value_randomized, "z": _finite_or_none(self.z),
            "null_mean": float(null.mean()) if null.size else None,
            "null_std": float(null.std(ddof=1)) if null.size > 1 else None,
            "pairs": [{"a": nm(a, i), "b": nm(b, j), "similarity": s} for i, j, s in self.pairs],
        }


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def fcas_score(
    a: ModelComponents, b: ModelComponents, k: int, *, match_function: bool = True, match_sign: bool = True
) -> tuple[float, list[tuple[int, int, float]]]:
    """Observed FCAS and its optimal matching (see module docstring)."""
    ta, tb = a.top_k(k), b.top_k(k)
    sim = similarity_matrix(a.depth[ta], a.label[ta], a.sign[ta], b.depth[tb], b.label[tb], b.sign[tb],
                            match_function=match_function, match_sign=match_sign)
    score, rows, cols = _matching_score(sim)
    pairs = [(int(ta[r]), int(tb[c]), float(sim[r, c])) for r, c in zip(rows, cols)]
    return score, pairs


def _random_subsets(rng: np.random.Generator, m: int, k: int, n: int) -> np.ndarray:
    """[n, k] uniformly random ordered k-subsets of range(m) (argsort of iid keys)."""
    return np.argsort(rng.random((n, m)), axis=1)[:, :k]


def permutation_null(
    a: ModelComponents, b: ModelComponents, k: int, *, n_permutations: int = 1000,
    null: str = "shuffle_depth", seed: int | np.random.Generator = 0,
    match_function: bool = True, match_sign: bool = True, chunk: int = 256,
) -> np.ndarray:
    """[n_permutations] FCAS values sampled under `null` (see module docstring)."""
    check_positive_int("stats.n_permutations", n_permutations)
    check_choice("stats.fcas_null", null, FCAS_NULLS)
    rng = as_rng(seed)
    ta, tb = a.top_k(k), b.top_k(k)
    out = np.empty(n_permutations)
    for start in range(0, n_permutations, chunk):
        n = min(chunk, n_permutations - start)
        # each model's k top rows get the depths of k distinct random rows
        ra = _random_subsets(rng, len(a), k, n)
        rb = _random_subsets(rng, len(b), k, n)
        if null == "shuffle_depth":
            args = (a.depth[ra], a.label[ta][None], a.sign[ta][None],
                    b.depth[rb], b.label[tb][None], b.sign[tb][None])
        else:
            args = (a.depth[ra], a.label[ra], a.sign[ra], b.depth[rb], b.label[rb], b.sign[rb])
        sims = similarity_matrix(*args, match_function=match_function, match_sign=match_sign)
        sims = np.broadcast_to(sims, (n, k, k))
        for i in range(n):
            out[start + i] = _matching_score(sims[i])[0]
    return out


def permutation_p_values(
    observed: float, null: np.ndarray, rng: np.random.Generator | None = None
) -> tuple[float, float, float]:
    """(p, p_randomized, z) of `observed` against the sampled `null` (upper tail).

    Values within 1e-12 (relative) of `observed` count as ties: the null and the observed
    FCAS are sums over matchings in different orders, so exact float equality is unreliable.
    """
    null = np.asarray(null, dtype=np.float64)
    n = null.size
    tol = 1e-12 * max(1.0, abs(observed))
    ge = int((null >= observed - tol).sum())
    gt = int((null > observed + tol).sum())
    eq = ge - gt
    p = (1 + ge) / (1 + n)
    u = (rng or np.random.default_rng()).random()
    p_rand = (gt + u * (1 + eq)) / (1 + n)
    sd = null.std(ddof=1) if n > 1 else 0.0
    z = (observed - null.mean()) / sd if sd > 0 else float("nan")
    return float(p), float(p_rand), float(z)


def fcas_test(
    a: ModelComponents, b: ModelComponents, k: int, *, n_permutations: int = 1000,
    null: str = "shuffle_depth", seed: int | np.random.Generator = 0,
    match_function: bool = True, match_sign: bool = True,
) -> FCASResult:
    """Observed FCAS with its permutation null, p-values and z (see module docstring).

    Args:
        a, b: the two models' components for the same task.
        k: top-k size (must not exceed either model's number of components).
        n_permutations: null draws.
        null: "shuffle_depth" or "random_sets".
        seed: seed or Generator for the null draws and the tie-randomization.
        match_function, match_sign: keep the label / sign indicator in the similarity.
    """
    check_top_k("stats.top_k", k, min(len(a), len(b)))
    rng = as_rng(seed)
    score, pairs = fcas_score(a, b, k, match_function=match_function, match_sign=match_sign)
    draws = permutation_null(a, b, k, n_permutations=n_permutations, null=null, seed=rng,
                             match_function=match_function, match_sign=match_sign)
    p, p_rand, z = permutation_p_values(score, draws, rng)
    logger.info("FCAS k=%d: %.4f (null %s mean %.4f, p=%.4g, z=%.2f)", k, score, null, draws.mean(), p, z)
    return FCASResult(score, int(k), pairs, draws, null, p, p_rand, z)


__all__: Sequence[str] = ["ModelComponents", "FCASResult", "similarity_matrix", "fcas_score",
                          "permutation_null", "permutation_p_values", "fcas_test"]
