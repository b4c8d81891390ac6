"""Steps 4-5 of cross-model feature matching, per profile: which latents take part, their matching
against the permutation null, the control's best matches, and every number as a document block.

4. Latents constant on the profile's rows (dead on the shared texts) are dropped (they have no
   correlation, and their null maxima of 0 would lower the threshold), and so are latents active
   on fewer than `min_active_words` words (a correlation carried by 1-4 non-zero rows is ~1 with
   any partner active on the same rows, which inflates both the observed maxima and the null's
   upper tail); then `match_features` (`mechflow.features.matching`) with `feature_matching.null_kind`
   and `feature_matching.n_permutations`. A latent is "matched" when its best-match correlation
   exceeds the null's 0.99 quantile (about 1% of latents would by chance if the rows were
   exchangeable).
5. `control_best`: A's latents against control latents of B that no training aligned with anything
   (`mechflow.features.profiles`); their count above the same threshold is the baseline.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mechflow.errors import DataError
from mechflow.features.config import FeatureMatchingConfig
from mechflow.features.matching import FeatureMatching, correlation_matrix, match_features

logger = logging.getLogger(__name__)

THRESHOLD_QUANTILE = 0.99  # "matched": best-match correlation above this quantile of the pooled null
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)


def _live(P: np.ndarray, min_active: int = 0) -> np.ndarray:
    """Columns that vary, and (with `min_active`) are non-zero on at least that many rows."""
    live = P.max(axis=0) > P.min(axis=0)
    return live & ((P != 0).sum(axis=0) >= min_active) if min_active else live


def _quantiles(x: np.ndarray) -> dict[str, float]:
    return {f"q{q:g}": float(np.quantile(x, q)) for q in QUANTILES} if x.size else {}


def pair_correlation(P_a: np.ndarray, P_b: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of columns a[k] of P_a and b[k] of P_b (0 where one is constant)."""
    x = P_a[:, a].astype(np.float64)
    y = P_b[:, b].astype(np.float64)
    x -= x.mean(0)
    y -= y.mean(0)
    den = np.sqrt((x * x).sum(0) * (y * y).sum(0))
    return np.divide((x * y).sum(0), den, out=np.zeros(len(a)), where=den > 0)


@dataclass
class ProfileMatch:
    """`match_features` on the live latents of one profile, with global latent indices."""

    kind: str
    n_rows: int
    live_a: np.ndarray  # global indices of A's live latents (rows of `res` arrays)
    live_b: np.ndarray
    res: FeatureMatching
    min_active: int = 0
    control: np.ndarray | None = None  # [n_live_a] best correlation with the control latents of B
    control_info: dict[str, Any] | None = None

    @property
    def threshold(self) -> float:
        return self.res.threshold(THRESHOLD_QUANTILE)

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Hungarian pairs as global (a, b, corr), sorted by decreasing correlation."""
        r = np.array([[i, j, c] for i, j, c in self.res.pairs]).reshape(-1, 3)
        order = np.argsort(-r[:, 2], kind="stable")
        r = r[order]
        return self.live_a[r[:, 0].astype(int)], self.live_b[r[:, 1].astype(int)], r[:, 2]


def match_profile(kind: str, P_a: np.ndarray, P_b: np.ndarray, cfg: FeatureMatchingConfig,
                  rng: np.random.Generator, min_active: int = 0) -> ProfileMatch:
    """Module step 4 for one profile: drop constant (and rarely active) latents, then `match_features`."""
    live_a, live_b = np.flatnonzero(_live(P_a, min_active)), np.flatnonzero(_live(P_b, min_active))
    if len(live_a) == 0 or len(live_b) == 0:
        side = "A" if len(live_a) == 0 else "B"
        raise DataError(f"feature matching ({kind} profile): no latent of model {side}'s SAE varies over the "
                        f"{P_a.shape[0]} shared rows" + (f" on at least {min_active} of them" if min_active else "")
                        + "; check the SAE (train_sae), give more texts or lower min_active_words")
    t0 = time.perf_counter()
    res = match_features(P_a[:, live_a], P_b[:, live_b], n_permutations=cfg.n_permutations, null=cfg.null_kind,
                         seed=rng)
    logger.info("%s profile: %d x %d live latents on %d rows matched in %.1fs", kind, len(live_a), len(live_b),
                P_a.shape[0], time.perf_counter() - t0)
    return ProfileMatch(kind, P_a.shape[0], live_a, live_b, res, min_active)


def control_best(P_a: np.ndarray, P_control: np.ndarray, min_active: int = 0) -> np.ndarray:
    """Best correlation of each column of `P_a` with the live columns of `P_control` (as `match_profile`)."""
    live = _live(P_control, min_active)
    if not live.any():
        return np.zeros(P_a.shape[1])
    return correlation_matrix(P_a, P_control[:, live])[0].max(axis=1)


def _histogram(observed: np.ndarray, null: np.ndarray, control: np.ndarray | None, bins: int = 40
               ) -> dict[str, list]:
    parts = [observed, null.ravel()] + ([control] if control is not None else [])
    edges = np.histogram_bin_edges(np.concatenate(parts), bins=bins)
    out = {"edges": edges.tolist(), "observed": np.histogram(observed, edges)[0].tolist(),
           "null": np.histogram(null.ravel(), edges)[0].tolist()}
    if control is not None:
        out["control"] = np.histogram(control, edges)[0].tolist()
    return out


def profile_document(pm: ProfileMatch, d_sae_a: int, d_sae_b: int) -> dict[str, Any]:
    """Every number of one profile's matching (global latent indices)."""
    res, thr = pm.res, pm.threshold
    n_perm = res.null_max.shape[0]
    p_min = 1.0 / (1 + n_perm)
    a, b, corr = pm.pairs()
    return {
        "n_rows": pm.n_rows, "d_sae_a": d_sae_a, "d_sae_b": d_sae_b,
        "n_live_a": len(pm.live_a), "n_live_b": len(pm.live_b),
        "min_active": pm.min_active,
        "n_excluded_a": d_sae_a - len(pm.live_a), "n_excluded_b": d_sae_b - len(pm.live_b),
        "threshold_quantile": THRESHOLD_QUANTILE, "threshold": thr,
        "n_matched": int((res.best_corr > thr).sum()),
        "fraction_matched": float((res.best_corr > thr).mean()),
        "n_expected_by_chance": (1 - THRESHOLD_QUANTILE) * len(pm.live_a),
        "n_pairs_matched": int((corr > thr).sum()),
        "p_min": p_min, "n_p_min": int((res.p_value <= p_min + 1e-12).sum()),
        "n_p_le_0.05": int((res.p_value <= 0.05).sum()),
        "best_corr_mean": float(res.best_corr.mean()), "best_corr_quantiles": _quantiles(res.best_corr),
        "null_mean": float(res.null_max.mean()), "null_quantiles": _quantiles(res.null_max.ravel()),
        "hist": _histogram(res.best_corr, res.null_max, pm.control),
        "features_a": pm.live_a.tolist(), "best_b": pm.live_b[res.best_b].tolist(),
        "best_corr": res.best_corr.tolist(), "p_value": res.p_value.tolist(),
        "excluded_features_a": sorted(set(range(d_sae_a)) - set(pm.live_a.tolist())),
        "excluded_features_b": sorted(set(range(d_sae_b)) - set(pm.live_b.tolist())),
        "pairs": {"a": a.tolist(), "b": b.tolist(), "corr": corr.tolist()},
        "control": None if pm.control is None else {
            **(pm.control_info or {}), "n_matched": int((pm.control > thr).sum()),
            "threshold": float(np.quantile(pm.control, THRESHOLD_QUANTILE)),
            "n_matched_above_control": int((res.best_corr > np.quantile(pm.control, THRESHOLD_QUANTILE)).sum()),
            "fraction_matched": float((pm.control > thr).mean()), "best_corr_mean": float(pm.control.mean()),
            "best_corr_quantiles": _quantiles(pm.control), "best_corr": pm.control.tolist()},
    }
