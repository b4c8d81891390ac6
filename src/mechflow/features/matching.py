"""Match dictionary features across two models by their fingerprints on shared inputs.

Steps:
    1. Fingerprint each feature by a profile over a shared axis:
         - activation profile: its activation on the same tokens of the same prompts in both
           models (the tokenizers differ, so use positions both models see as the same string,
           e.g. word-final tokens, or pool per word), or
         - logit-effect profile: its direct effect on the logits of token strings present in
           both vocabularies (`shared_vocabulary` aligns them).
       Profiles are matrices P_a [n_shared, f_a], P_b [n_shared, f_b].
    2. Pearson correlation of every pair of features: C = Z_a^T Z_b / n with z-scored columns.
       Features that are constant on the shared axis (dead) have no correlation: their rows /
       columns are set to 0 and flagged.
    3. Best match per feature of A: argmax_j C[i, j]; optimal one-to-one matching: Hungarian
       algorithm on C (`linear_sum_assignment`, maximize), rectangular allowed.
    4. Null of the best-match correlation: break the alignment of the shared axis by permuting
       B's rows (null="shuffle", n_perm times) or by circularly shifting them by a random
       non-zero offset (null="circular_shift", which keeps the serial dependence of tokens
       within the text and so gives a less optimistic null for activation profiles). Each draw
       gives max_j C_null[i, j] for every i; per-feature p = (1 + #{null_i >= observed_i}) / (1 + n_perm),
       and the pooled draws give a threshold (e.g. the 0.99 quantile) for "matched".
       Shuffling assumes shared-axis entries are exchangeable; for token activations with
       strong serial correlation, prefer circular_shift.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from mechflow.errors import DataError
from mechflow.features.config import FEATURE_NULLS
from mechflow.stats.checks import as_rng, check_choice, check_positive_int, finite_array

logger = logging.getLogger(__name__)


def _zscore(P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    Pc = P - P.mean(axis=0, keepdims=True)
    sd = np.sqrt((Pc**2).mean(axis=0))
    dead = sd <= 1e-12 * max(1.0, float(np.abs(P).max(initial=0.0)))
    return np.divide(Pc, sd, out=np.zeros_like(Pc), where=~dead), dead


def correlation_matrix(profile_a: np.ndarray, profile_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pearson correlations [f_a, f_b] of profiles [n_shared, f_a] and [n_shared, f_b].

    Returns:
        (C, dead_a, dead_b): dead features (constant on the shared axis) get correlation 0.
    """
    Pa = finite_array("profile_a [n_shared, f_a]", profile_a, 2, min_rows=2)
    Pb = finite_array("profile_b [n_shared, f_b]", profile_b, 2, min_rows=2)
    if Pa.shape[0] != Pb.shape[0]:
        raise DataError(f"feature matching: profiles must share the first axis (same tokens/strings); "
                        f"got {Pa.shape[0]} and {Pb.shape[0]} rows")
    Za, dead_a = _zscore(Pa)
    Zb, dead_b = _zscore(Pb)
    return Za.T @ Zb / Pa.shape[0], dead_a, dead_b


@dataclass(frozen=True)
class FeatureMatching:
    """Cross-model feature matches and their permutation null.

    Attributes:
        best_b: [f_a] index of the best-correlated feature of B for each feature of A.
        best_corr: [f_a] that correlation.
        pairs: (i, j, corr) of the optimal one-to-one matching.
        null_max: [n_perm, f_a] best-match correlation of each A feature under the null.
        p_value: [f_a] per-feature (1 + #{null_i >= observed_i}) / (1 + n_perm).
        dead_a / dead_b: features constant on the shared axis (never matched: corr 0).
        null_kind: "shuffle" or "circular_shift".
    """

    best_b: np.ndarray
    best_corr: np.ndarray
    pairs: list[tuple[int, int, float]]
    null_max: np.ndarray
    p_value: np.ndarray
    dead_a: np.ndarray
    dead_b: np.ndarray
    null_kind: str

    def threshold(self, q: float = 0.99) -> float:
        """Quantile of the pooled null best-match correlations (a "matched" cut-off)."""
        return float(np.quantile(self.null_max, q))


def match_features(
    profile_a: np.ndarray, profile_b: np.ndarray, *, n_permutations: int = 100,
    null: str = "shuffle", seed: int | np.random.Generator = 0,
) -> FeatureMatching:
    """Best and optimal one-to-one matches of A's features to B's, with a permutation null.

    Args:
        profile_a: [n_shared, f_a] fingerprints of model A's features (columns).
        profile_b: [n_shared, f_b] fingerprints of model B's features, same rows.
        n_permutations: null draws (each costs one [f_a, f_b] correlation product).
        null: "shuffle" (permute B's rows) or "circular_shift" (roll B's rows).
        seed: seed or Generator for the null.
    """
    check_positive_int("feature_matching.n_permutations", n_permutations)
    check_choice("feature_matching.null_kind", null, FEATURE_NULLS)
    C, dead_a, dead_b = correlation_matrix(profile_a, profile_b)
    n = C.shape[0]
    rows = np.asarray(profile_a).shape[0]
    best_b = np.argmax(C, axis=1)
    best = C[np.arange(n), best_b]
    r, c = linear_sum_assignment(C, maximize=True)
    pairs = [(int(i), int(j), float(C[i, j])) for i, j in zip(r, c)]

    rng = as_rng(seed)
    Za, _ = _zscore(np.asarray(profile_a, dtype=np.float64))
    Zb, _ = _zscore(np.asarray(profile_b, dtype=np.float64))
    null_max = np.empty((n_permutations, n))
    for t in range(n_permutations):
        if null == "shuffle":
            Zp = Zb[rng.permutation(rows)]
        else:
            Zp = np.roll(Zb, int(rng.integers(1, rows)), axis=0)
        null_max[t] = (Za.T @ Zp / rows).max(axis=1)
    p = (1 + (null_max >= best[None, :] - 1e-12).sum(axis=0)) / (1 + n_permutations)
    return FeatureMatching(best_b, best, pairs, null_max, p, dead_a, dead_b, null)


def normalize_token(s: str) -> str:
    """Map the tokenizers' word-start markers to a space: GPT-2 BPE "Ġ" and SentencePiece "▁"."""
    return s.replace("\u0120", " ").replace("\u2581", " ")


def shared_vocabulary(
    vocab_a: Sequence[str], vocab_b: Sequence[str], normalize: Callable[[str], str] | None = normalize_token
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Token ids of the strings present in both vocabularies (for logit-effect fingerprints).

    Args:
        vocab_a / vocab_b: token strings indexed by token id (e.g. `tokenizer.convert_ids_to_tokens(range(V))`).
        normalize: applied to every string before comparing (default: word-start markers -> " ").

    Returns:
        (ids_a, ids_b, strings) sorted by string; a string appearing twice in one vocabulary
        keeps its lowest id.
    """
    first_a: dict[str, int] = {}
    norm = normalize or (lambda t: t)
    for i, s in enumerate(vocab_a):
        first_a.setdefault(norm(s), i)
    first_b: dict[str, int] = {}
    for i, s in enumerate(vocab_b):
        first_b.setdefault(norm(s), i)
    strings = sorted(set(first_a) & set(first_b))
    if not strings:
        raise DataError("shared_vocabulary: the two vocabularies share no token string")
    return (np.array([first_a[s] for s in strings]), np.array([first_b[s] for s in strings]), strings)
