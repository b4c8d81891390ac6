"""The computing steps of cross-model feature matching, for one pair of models with their SAEs.

`activation_step`: steps 2, 4 and 5 for the activation profile (each model reads the shared texts
with its SAE spliced in; the SAE latents and the control latents are pooled per word and matched);
`logit_step`: steps 3-5 for the logit-effect profile (skipped when a hook is not in the residual
basis). Each returns what the document needs (`mechflow.features.matching_report`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mechflow.errors import ConfigError, DataError
from mechflow.features.attribution import SplicedSAE
from mechflow.features.config import FeatureMatchingConfig
from mechflow.features.matching import shared_vocabulary
from mechflow.features.profile_match import ProfileMatch, control_best, match_profile
from mechflow.features.profiles import (
    activation_profile,
    control_activation_profile,
    is_residual,
    load_side_sae,
    logit_profile,
    random_directions,
    vocabulary,
)
from mechflow.features.texts import ModelSide, SharedTexts, tokenize_words, word_spans

logger = logging.getLogger(__name__)


def load_sides(training_a: Path, training_b: Path, model_cfg_a: Mapping[str, Any] | None,
                model_cfg_b: Mapping[str, Any] | None) -> tuple[ModelSide, ModelSide]:
    if model_cfg_a is None or model_cfg_b is None:
        raise ConfigError("feature_matching needs model_cfg_a and model_cfg_b (the `model` groups of the "
                          "pair's runs) or loaded `sides`")
    for training in (training_a, training_b):  # a missing SAE fails before the models load
        if not (Path(training).parent / "cfg.json").is_file():
            raise DataError(f"SAE folder {Path(training).parent} does not exist or has no cfg.json: run the "
                            "train_sae stage (feature matching needs an SAE for both models of the pair)")
    return ModelSide.load(model_cfg_a), ModelSide.load(model_cfg_b)


@dataclass
class ActivationStep:
    """Everything steps 1-2 and the activation matching (4-5) produce, for the later steps."""

    texts: SharedTexts
    sides: tuple[ModelSide, ModelSide]
    spliced: tuple[Any, Any]
    hooks: tuple[str, str]
    residual: tuple[bool, bool]
    keep: np.ndarray  # words with tokens in both models
    words: list[str]  # the kept words (rows)
    profiles: tuple[np.ndarray, np.ndarray]  # [rows, d_sae] each
    match: ProfileMatch
    seconds: dict[str, float]

    @property
    def d_sae(self) -> tuple[int, int]:
        return self.spliced[0].decoder.shape[0], self.spliced[1].decoder.shape[0]


def activation_step(st: SharedTexts, sides: tuple[ModelSide, ModelSide], trainings: tuple[Path, Path],
                     cfg: FeatureMatchingConfig, seeds: Sequence[np.random.SeedSequence], min_active: int,
                     batch_size: int
                     ) -> ActivationStep:
    """Module steps 2, 4 and 5 for the activation profile."""
    spans = [word_spans(t) for t in st.texts]
    n_words = [len(s) for s in spans]
    seconds: dict[str, float] = {}
    P, seen, spliced, hooks, residual, tokenized, l0 = [], [], [], [], [], [], []
    for tag, side, training in zip("ab", sides, trainings):
        t = time.perf_counter()
        sae, hook = load_side_sae(training, side)
        sp = SplicedSAE.build(side.model, sae, hook, 1 if side.prepend_bos else 0)
        tokenized.append([tokenize_words(side, text, sp_) for text, sp_ in zip(st.texts, spans)])
        prof, hit, mean_l0 = activation_profile(sp, side, tokenized[-1], n_words, batch_size, side.name)
        P.append(prof)
        seen.append(hit)
        l0.append(mean_l0)
        spliced.append(sp)
        hooks.append(hook)
        residual.append(is_residual(hook, sae, side.model))
        seconds[f"activations_{tag}"] = time.perf_counter() - t
    keep = seen[0] & seen[1]
    words = [w for w, k in zip((text[s:e] for text, sp_ in zip(st.texts, spans) for s, e in sp_), keep) if k]
    if len(words) < 2:
        raise DataError(f"feature matching: {len(words)} shared word(s) got tokens in both models; give more texts")
    P_a, P_b = P[0][keep], P[1][keep]
    t = time.perf_counter()
    match = match_profile("activation", P_a, P_b, cfg, np.random.default_rng(seeds[1]), min_active)
    seconds["match_activation"] = time.perf_counter() - t
    t = time.perf_counter()
    d_sae_b = spliced[1].decoder.shape[0]
    k = max(1, round(l0[1]))
    dirs = random_directions(d_sae_b, spliced[1].sae.cfg.d_in, seeds[4]).T.contiguous()
    P_ctrl = control_activation_profile(spliced[1], sides[1], tokenized[1], n_words, dirs, k, batch_size)
    match.control = control_best(P_a[:, match.live_a], P_ctrl[keep], min_active)
    match.control_info = {"latents": f"top-{k} of ReLU((x - b_dec) . r) over {d_sae_b} random unit directions r "
                                     f"at {hooks[1]} of {sides[1].name} (k = the SAE's mean L0 on the texts)",
                          "k": k, "mean_l0_a": l0[0], "mean_l0_b": l0[1]}
    seconds["control_activation"] = time.perf_counter() - t
    return ActivationStep(st, sides, (spliced[0], spliced[1]), (hooks[0], hooks[1]), (residual[0], residual[1]),
                          keep, words, (P_a, P_b), match, seconds)


@dataclass
class LogitStep:
    """Step 3 and the logit-effect matching (4-5)."""

    vocabulary: dict[str, Any]
    profiles: tuple[np.ndarray, np.ndarray]  # [tokens, d_sae] each
    match: ProfileMatch
    seconds: dict[str, float]


def logit_step(acts: ActivationStep, cfg: FeatureMatchingConfig, seeds: Sequence[np.random.SeedSequence],
                max_vocab: int) -> LogitStep | None:
    """Module steps 3-5 for the logit-effect profile (None when a hook is not in the residual basis)."""
    if not all(acts.residual):
        logger.warning("hooks %s / %s: not both in the residual basis, no logit-effect profile", *acts.hooks)
        return None
    sides, spliced = acts.sides, acts.spliced
    t = time.perf_counter()
    ids_a, ids_b, strings = shared_vocabulary(vocabulary(sides[0], "a"), vocabulary(sides[1], "b"))
    n_shared = len(strings)
    if n_shared > max_vocab:
        pick = np.sort(np.random.default_rng(seeds[2]).choice(n_shared, size=max_vocab, replace=False))
        ids_a, ids_b, strings = ids_a[pick], ids_b[pick], [strings[i] for i in pick]
    L = (logit_profile(sides[0].model, spliced[0].decoder, ids_a),
         logit_profile(sides[1].model, spliced[1].decoder, ids_b))
    seconds = {"logit_profiles": time.perf_counter() - t}
    t = time.perf_counter()
    match = match_profile("logit", L[0], L[1], cfg, np.random.default_rng(seeds[3]))
    seconds["match_logit"] = time.perf_counter() - t
    d_sae_b = spliced[1].decoder.shape[0]
    dirs = random_directions(d_sae_b, spliced[1].decoder.shape[1], seeds[5]).to(spliced[1].decoder.dtype)
    match.control = control_best(L[0][:, match.live_a], logit_profile(sides[1].model, dirs, ids_b))
    match.control_info = {"latents": f"{d_sae_b} random unit decoder directions in {sides[1].name}'s residual "
                                     "stream, through its final norm and W_U"}
    vocab = {"n_shared": n_shared, "n_used": len(strings), "max_vocab": max_vocab,
             "examples": strings[:: max(1, len(strings) // 20)][:20]}
    return LogitStep(vocab, L, match, seconds)
