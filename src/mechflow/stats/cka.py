"""Linear CKA between the representations of two models on the same tokens.

Kornblith, Norouzi, Lee & Hinton (2019), "Similarity of Neural Network Representations
Revisited", ICML, eq. (2)-(4).

Steps:
    1. Stack activations of both models on the same n tokens: X [n, d1], Y [n, d2] (the same
       row must be the same token of the same prompt in both).
    2. Centre each column: X <- X - mean(X, 0), Y <- Y - mean(Y, 0).
    3. Linear CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), the feature-space form of
       HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = X X^T, L = Y Y^T and
       HSIC(K, L) = tr(K H L H) / (n - 1)^2 (the (n-1)^-2 cancels). Cost O(n d1 d2), no n x n Gram.
    4. By depth: CKA for every (layer of A, layer of B) pair, with each layer's relative depth
       (layer + 0.5) / n_layers (the convention of `fcas.py`), so models of different depths
       can be compared on one axis.

CKA is invariant to orthogonal transforms and isotropic scaling of either side (not to
arbitrary invertible linear maps), is 1 for identical representations, and lies in [0, 1].
Computed in float64: activations in float32 lose digits in the Gram products.

Bias. With fewer examples than dimensions (here ~100 prompts vs d_model ~600) the plug-in HSIC
is biased upward: two INDEPENDENT random representations get CKA far above 0. `debiased_linear_cka`
replaces HSIC by Song et al.'s (2012) unbiased estimator, as Nguyen, Raghu & Kornblith (2021,
"Do wide and deep networks learn the same things?") do; its expectation is 0 for independent
representations (it can then be slightly negative). mechflow reports both, headlines the debiased
one, and `shuffled_baseline` gives the value of either when the rows of B are permuted (the
level that means "no shared structure" at this n).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from mechflow.errors import DataError
from mechflow.stats.checks import finite_array

logger = logging.getLogger(__name__)


def _centered(name: str, X: np.ndarray) -> np.ndarray:
    X = finite_array(name, X, 2, min_rows=2)
    return X - X.mean(axis=0, keepdims=True)


def linear_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Linear CKA of X [n, d1] and Y [n, d2] (rows = the same tokens).

    Raises:
        DataError: different row counts, fewer than 2 rows, NaNs, or a constant representation
            (CKA undefined).
    """
    Xc = _centered("cka X [n_tokens, d1]", X)
    Yc = _centered("cka Y [n_tokens, d2]", Y)
    return _cka_centered(Xc, Yc, _self_norm(Xc), _self_norm(Yc))


def _self_norm(Xc: np.ndarray) -> float:
    return float(np.linalg.norm(Xc.T @ Xc, "fro"))


def _cka_centered(Xc: np.ndarray, Yc: np.ndarray, nx: float, ny: float) -> float:
    if Xc.shape[0] != Yc.shape[0]:
        raise DataError(f"cka: X and Y must hold the same tokens (rows); got {Xc.shape[0]} and {Yc.shape[0]}")
    if nx == 0 or ny == 0:
        raise DataError("cka: a representation is constant over all tokens, so CKA is undefined "
                        "(check the hook name and that the tokens are not all padding)")
    return float(np.linalg.norm(Yc.T @ Xc, "fro") ** 2 / (nx * ny))


def _debiased_dot(xty: float, rows_x: np.ndarray, rows_y: np.ndarray, n: int) -> float:
    """Unbiased HSIC (Song et al. 2012) of centred features, up to a factor that cancels in CKA:
    ||Y^T X||^2 - n/(n-2) <r_x, r_y> + ||X||^2 ||Y||^2 / ((n-1)(n-2)), r = squared row norms."""
    return float(xty - n / (n - 2.0) * rows_x.dot(rows_y) + rows_x.sum() * rows_y.sum() / ((n - 1.0) * (n - 2.0)))


def debiased_linear_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Linear CKA with the unbiased HSIC estimator (feature-space form, O(n d1 d2); needs n >= 4).

    Expectation 0 for independent representations; 1 for identical ones. NaN where a debiased
    self-similarity is not positive (too few rows for that representation).
    """
    Xc = _centered("cka X [n_tokens, d1]", X)
    Yc = _centered("cka Y [n_tokens, d2]", Y)
    return _debiased_centered(Xc, Yc, *_debiased_self(Xc), *_debiased_self(Yc))


def _debiased_self(Xc: np.ndarray) -> tuple[np.ndarray, float]:
    n = Xc.shape[0]
    if n < 4:
        raise DataError(f"debiased CKA needs at least 4 tokens (rows); got {n}")
    rows = np.einsum("ij,ij->i", Xc, Xc)
    return rows, _debiased_dot(float(np.linalg.norm(Xc.T @ Xc, "fro") ** 2), rows, rows, n)


def _debiased_centered(Xc: np.ndarray, Yc: np.ndarray, rows_x: np.ndarray, hxx: float,
                       rows_y: np.ndarray, hyy: float) -> float:
    if Xc.shape[0] != Yc.shape[0]:
        raise DataError(f"cka: X and Y must hold the same tokens (rows); got {Xc.shape[0]} and {Yc.shape[0]}")
    if hxx <= 0 or hyy <= 0:
        return float("nan")
    hxy = _debiased_dot(float(np.linalg.norm(Yc.T @ Xc, "fro") ** 2), rows_x, rows_y, Xc.shape[0])
    return hxy / float(np.sqrt(hxx * hyy))


def unbiased_hsic_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Debiased CKA through the Gram-matrix formula of Song et al. (2012), eq. (5) (O(n^2); the
    reference for tests): HSIC_u = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~ L~ 1] / (n(n-3)),
    K~ = K with its diagonal set to 0, K = Xc Xc^T of the column-centred X."""
    X = finite_array("cka X", X, 2, min_rows=4)
    Y = finite_array("cka Y", Y, 2, min_rows=4)
    X, Y = X - X.mean(0), Y - Y.mean(0)
    n = X.shape[0]

    def tilde(A: np.ndarray) -> np.ndarray:
        G = A @ A.T
        np.fill_diagonal(G, 0.0)
        return G

    def hsic(K: np.ndarray, L: np.ndarray) -> float:
        one = np.ones(n)
        return float(np.trace(K @ L) + one @ K @ one * (one @ L @ one) / ((n - 1) * (n - 2))
                     - 2.0 / (n - 2) * one @ K @ L @ one) / (n * (n - 3))

    K, L = tilde(X), tilde(Y)
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def hsic_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Linear CKA through the Gram-matrix HSIC formula (O(n^2); the reference for tests)."""
    X = finite_array("cka X", X, 2, min_rows=2)
    Y = finite_array("cka Y", Y, 2, min_rows=2)
    n = X.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = X @ X.T, Y @ Y.T

    def hsic(A: np.ndarray, B: np.ndarray) -> float:
        return float(np.trace(A @ H @ B @ H)) / (n - 1) ** 2

    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


@dataclass(frozen=True)
class DepthCKA:
    """CKA between every layer of model A and every layer of model B.

    Attributes:
        matrix: [n_layers_a, n_layers_b] linear CKA.
        layers_a / layers_b: layer indices in matrix order.
        depth_a / depth_b: relative depths (layer + 0.5) / n_layers.
        debiased: [n_layers_a, n_layers_b] debiased linear CKA (`debiased_linear_cka`).
        best_match_b: for each layer of A, the layer of B with the highest CKA.
    """

    matrix: np.ndarray
    layers_a: list[int]
    layers_b: list[int]
    depth_a: np.ndarray
    depth_b: np.ndarray
    debiased: np.ndarray | None = None
    shuffled: list[dict[str, float]] | None = None  # per layer of A: `shuffled_baseline` vs its depth-matched B layer

    @property
    def depth_matched_b(self) -> np.ndarray:
        """Index (into layers_b) of the B layer nearest in relative depth to each layer of A."""
        return np.argmin(np.abs(np.asarray(self.depth_a)[:, None] - np.asarray(self.depth_b)[None, :]), axis=1)

    @property
    def best_match_b(self) -> np.ndarray:
        return np.asarray(self.layers_b)[np.argmax(self.matrix, axis=1)]


def cka_by_depth(
    acts_a: Mapping[int, np.ndarray] | Sequence[np.ndarray],
    acts_b: Mapping[int, np.ndarray] | Sequence[np.ndarray],
    *, n_layers_a: int | None = None, n_layers_b: int | None = None, n_shuffles: int = 0, seed: int = 0,
) -> DepthCKA:
    """Linear CKA matrix over layers of two models on the same tokens.

    Args:
        acts_a: layer -> [n_tokens, d_a] residual-stream activations of model A (a list means
            layers 0..len-1).
        acts_b: same for model B (same n_tokens, same token order).
        n_layers_a / n_layers_b: model depth for the relative-depth axis (default: number of
            layers given, which is right when every layer is given).
        n_shuffles: if > 0, `shuffled_baseline` of each layer of A against its depth-matched
            layer of B (seeded), so the report can say what "no shared structure" scores at this n.
    """
    da = dict(enumerate(acts_a)) if not isinstance(acts_a, Mapping) else dict(acts_a)
    db = dict(enumerate(acts_b)) if not isinstance(acts_b, Mapping) else dict(acts_b)
    if not da or not db:
        raise DataError("cka_by_depth: need activations for at least one layer of each model")
    la, lb = sorted(da), sorted(db)
    ca = {l: _centered(f"cka acts_a[{l}]", da[l]) for l in la}
    cb = {l: _centered(f"cka acts_b[{l}]", db[l]) for l in lb}
    na = {l: _self_norm(x) for l, x in ca.items()}
    nb = {l: _self_norm(y) for l, y in cb.items()}
    mat = np.array([[_cka_centered(ca[i], cb[j], na[i], nb[j]) for j in lb] for i in la])
    n_rows = next(iter(ca.values())).shape[0]
    deb = None
    if n_rows >= 4:
        sa = {l: _debiased_self(x) for l, x in ca.items()}
        sb = {l: _debiased_self(y) for l, y in cb.items()}
        deb = np.array([[_debiased_centered(ca[i], cb[j], *sa[i], *sb[j]) for j in lb] for i in la])
    La = n_layers_a or (max(la) + 1)
    Lb = n_layers_b or (max(lb) + 1)
    res = DepthCKA(mat, la, lb, (np.asarray(la) + 0.5) / La, (np.asarray(lb) + 0.5) / Lb, deb)
    if n_shuffles > 0:
        matched = res.depth_matched_b
        shuffled = [shuffled_baseline(da[l], db[lb[matched[i]]], n_shuffles, seed + i) for i, l in enumerate(la)]
        res = DepthCKA(mat, la, lb, res.depth_a, res.depth_b, deb, shuffled)
    return res


def shuffled_baseline(X: np.ndarray, Y: np.ndarray, n_shuffles: int = 20, seed: int = 0) -> dict[str, float]:
    """Mean linear and debiased CKA of X against Y with its rows permuted (token correspondence
    destroyed): the value each estimator gives when the two representations share nothing."""
    rng = np.random.default_rng(seed)
    lin, deb = [], []
    for _ in range(n_shuffles):
        Yp = Y[rng.permutation(Y.shape[0])]
        lin.append(linear_cka(X, Yp))
        deb.append(debiased_linear_cka(X, Yp))
    return {"linear": float(np.mean(lin)), "debiased": float(np.nanmean(deb)), "n_shuffles": n_shuffles}
