"""Cross-model feature matching stage: do two models' SAEs learn the same features?

After the universality analyses of Bricken et al. (2023, "Towards Monosemanticity") and Lan et al.
(2024, "Sparse autoencoders reveal universal feature spaces across large language models"), each
SAE latent is fingerprinted on inputs both models share, and the fingerprints are matched by
correlation against a sampled permutation null (`mechflow.features.matching`).

`feature_matching` (rule `feature_matching`, one pair of runs that differ only in the model):
    1. Shared texts: the union of both runs' task prompts (each task's prompts of A, then B's
       that A lacks; a seeded sample of whole prompts up to `task_words` words) and corpus
       passages of at most `passage_words` words, one in every `passage_stride`, from the start
       of the corpus stream (the text the SAEs were trained on) up to `corpus_words` words. A word is a maximal run
       of non-space characters; the rows of both activation profiles are these words, in text order.
    2. Activation profiles P [n_words, d_sae]: each model reads every text with its own
       tokenizer and BOS convention (`mechflow.models.encode`); a word's value for a latent is
       the maximum of the latent over the tokens whose character span (the fast tokenizer's
       offset mapping) overlaps the word, so different tokenizations meet at the word. Words
       that one tokenizer drops are left out of both profiles.
    3. Logit-effect profiles [n_tokens, d_sae]: each latent's decoder direction through the final
       norm and W_U (`mechflow.features.logits.unembed_directions`, direct path), on the token
       strings both vocabularies hold (`shared_vocabulary`, word-start markers unified, special
       tokens left out), a seeded sample of at most `max_vocab`; W_U is cut to those columns
       before the product, so the 262k-token Gemma vocabulary never meets d_sae in memory.
    4. Per profile, latents constant on its rows (dead on the shared texts) are dropped (they
       have no correlation, and their null maxima of 0 would lower the threshold), and so are
       latents active on fewer than `min_active_words` words (a correlation carried by 1-4
       non-zero rows is ~1 with any partner active on the same rows, which inflates both the
       observed maxima and the null's upper tail); then
       `match_features` with `feature_matching.null_kind` and `feature_matching.n_permutations`
       (seeded from `feature_matching.seed`): best match and p-value of every latent of A, the optimal one-to-one
       (Hungarian) matching, and the pooled null of best-match correlations. A latent is
       "matched" when its best-match correlation exceeds the null's 0.99 quantile (about 1% of
       latents would by chance if the rows were exchangeable).
    5. Control: the permutation null breaks the row alignment, so any two functions of the same
       input beat it, e.g. two detectors of one frequent word. A's latents are therefore also
       matched against control latents of B that no training aligned with anything: top-k of
       ReLU((x - b_dec) . r) over random unit directions r at B's hook (k = B's mean L0 on the
       texts) for activations, random decoder directions for logit effects. The control's
       count above the same threshold is the baseline for the SAE's count; the stricter count
       of A latents above the control's own 0.99 quantile is reported beside it.
    6. feature_matching.json (every number), feature_matching.md and feature_matching.png
       (observed best-match correlations vs the null, per profile), each written atomically.

Modules: step 1 `mechflow.features.texts`, steps 2-3 `mechflow.features.profiles`, steps 4-5
`mechflow.features.profile_match` (with `mechflow.features.matching`), chained per profile by
`mechflow.features.matching_steps`; step 6 `mechflow.features.matching_report`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mechflow.errors import ConfigError
from mechflow.features.config import FeatureMatchingConfig
from mechflow.features.matching_report import matching_document, write_matching
from mechflow.features.matching_steps import activation_step, load_sides, logit_step
from mechflow.features.texts import ModelSide, SharedTexts, shared_texts


def feature_matching(
    cfg: FeatureMatchingConfig | Mapping[str, Any] | None,
    *,
    training_a: Path,
    training_b: Path,
    matching: Path,
    summary: Path,
    figure: Path,
    datasets_a: Sequence[Path] | Path | None = None,
    datasets_b: Sequence[Path] | Path | None = None,
    corpus_cfg: Mapping[str, Any] | None = None,
    model_cfg_a: Mapping[str, Any] | None = None,
    model_cfg_b: Mapping[str, Any] | None = None,
    sides: tuple[ModelSide, ModelSide] | None = None,
    texts: Sequence[str] | None = None,
    task_words: int = 2048,
    corpus_words: int = 2048,
    passage_words: int = 48,
    passage_stride: int = 8,
    max_vocab: int = 4096,
    min_active_words: int = 5,
    n_top: int = 20,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Stage function of rule `feature_matching` (steps 1-6 of the module docstring).

    Args:
        cfg: the `feature_matching` group (a plain mapping is validated by `FeatureMatchingConfig`).
        training_a / training_b: `training.json` of each run's SAE folder (written by `train_sae`).
        matching, summary, figure: output paths (JSON, Markdown, PNG).
        datasets_a / datasets_b: each run's `tasks/<task>/dataset.jsonl` (shared prompts).
        corpus_cfg: the `corpus` group (passages); None: task prompts only.
        model_cfg_a / model_cfg_b: the `model` groups (loaded with their tokenizers).
        sides: already loaded models with tokenizers (tests); replaces the model configs.
        texts: the shared texts themselves (tests); replaces datasets and corpus.
        task_words / corpus_words / passage_words: word budgets of step 1 (rows of the
            activation profiles; each null draw costs 2 x rows x d_sae_a x d_sae_b flops).
        passage_stride: one corpus passage in this many is read (more topics for the same rows).
        max_vocab: shared token strings sampled for the logit-effect profile (its rows).
        min_active_words: latents active on fewer words are left out of the activation matching.
        n_top: matched pairs listed with their top tokens and words.

    Returns:
        Headline numbers (matched latents per profile, thresholds) and the written paths.
    """
    cfg = FeatureMatchingConfig.from_dict(cfg)  # a FeatureMatchingConfig passes through; None: the defaults
    _check_counts(task_words=task_words, corpus_words=corpus_words, min_active_words=min_active_words,
                  passage_words=passage_words, passage_stride=passage_stride, max_vocab=max_vocab, n_top=n_top,
                  batch_size=batch_size)
    seeds = np.random.SeedSequence(cfg.seed).spawn(6)
    t0 = time.perf_counter()
    if texts is None:
        st = shared_texts(datasets_a, datasets_b, corpus_cfg, task_words=task_words, corpus_words=corpus_words,
                          passage_words=passage_words, seed=int(seeds[0].generate_state(1)[0]),
                          stride=passage_stride)
    else:
        st = SharedTexts([str(t) for t in texts], ["given"] * len(texts), 0)
    if sides is None:
        sides = load_sides(training_a, training_b, model_cfg_a, model_cfg_b)
    acts = activation_step(st, sides, (Path(training_a), Path(training_b)), cfg, seeds, min_active_words,
                            batch_size)
    logit = logit_step(acts, cfg, seeds, max_vocab)
    doc = matching_document(cfg, acts, logit, n_top, Path(training_a).parent, Path(training_b).parent)
    doc["seconds"] = {**acts.seconds, **(logit.seconds if logit else {}), "total": time.perf_counter() - t0}
    return write_matching(doc, Path(matching), Path(summary), Path(figure))


def _check_counts(**counts: Any) -> None:
    for name, v in counts.items():
        low = 0 if name in ("task_words", "corpus_words", "min_active_words") else 1
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ConfigError(f"feature matching: {name}={v!r} must be an integer >= {low}")
