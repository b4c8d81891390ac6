"""Cross-model feature matching stage: do two models' SAEs learn the same features?

After the universality analyses of Bricken et al. (2023, "Towards Monosemanticity") and Lan et al.
(2024, "Sparse autoencoders reveal universal feature spaces across large language models"), each
SAE latent is fingerprinted on inputs both models share, and the fingerprints are matched by
correlation against a sampled permutation null (`mechflow.stats.feature_matching`).

`run_feature_matching` (rule `feature_matching`, one pair of runs that differ only in the model):
    1. Shared texts: the union of both runs' task prompts (each task's prompts of A, then B's
       that A lacks; a seeded sample of whole prompts up to `task_words` words) and corpus
       passages of at most `passage_words` words, one in every `passage_stride`, from the start
       of the corpus stream (the text the SAEs were trained on) up to `corpus_words` words. A word is a maximal run of
       non-space characters; the rows of both activation profiles are these words, in text order.
    2. Activation profiles P [n_words, d_sae]: each model reads every text with its own
       tokenizer and BOS convention (`mechflow.models.encode`); a word's value for a latent is
       the maximum of the latent over the tokens whose character span (the fast tokenizer's
       offset mapping) overlaps the word, so different tokenizations meet at the word. Words
       that one tokenizer drops are left out of both profiles.
    3. Logit-effect profiles [n_tokens, d_sae]: each latent's decoder direction through the final
       norm and W_U (`dictionaries.features.unembed_directions`, direct path), on the token
       strings both vocabularies hold (`shared_vocabulary`, word-start markers unified, special
       tokens left out), a seeded sample of at most `max_vocab`; W_U is cut to those columns
       before the product, so the 262k-token Gemma vocabulary never meets d_sae in memory.
    4. Per profile, latents constant on its rows (dead on the shared texts) are dropped (they
       have no correlation, and their null maxima of 0 would lower the threshold), and so are
       latents active on fewer than `min_active_words` words (a correlation carried by 1-4
       non-zero rows is ~1 with any partner active on the same rows, which inflates both the
       observed maxima and the null's upper tail); then
       `match_features` with `stats.feature_null` and `stats.feature_n_permutations` (seeded
       from `stats.seed`): best match and p-value of every latent of A, the optimal one-to-one
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
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mechflow.contracts.dictionaries import DictionaryTraining
from mechflow.contracts.documents import load_document, write_document
from mechflow.contracts.stats import FeatureMatchingDocument
from mechflow.errors import ConfigError, DataError
from mechflow.io import atomic_path, atomic_write_text
from mechflow.stats.config import StatsConfig
from mechflow.stats.feature_matching import (
    FeatureMatching,
    match_features,
    normalize_token,
    shared_vocabulary,
)

logger = logging.getLogger(__name__)

THRESHOLD_QUANTILE = 0.99  # "matched": best-match correlation above this quantile of the pooled null
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)
_WORD = re.compile(r"\S+")
DEFINITION = (
    "Each SAE latent is fingerprinted by (i) its activation on the words of shared texts (max over the "
    "model's tokens overlapping the word) and (ii) its direct logit effect on token strings in both "
    "vocabularies; latents of A and B are compared by Pearson correlation of fingerprints. best_corr: "
    "max over B's latents; null: the same maximum after permuting B's rows (stats.feature_null); "
    "matched: best_corr > the 0.99 quantile of the pooled null; pairs: optimal one-to-one (Hungarian) "
    "matching (mechflow.stats.feature_stage)")


# ----------------------------------------------------------------------------- 1. shared texts


@dataclass(frozen=True)
class SharedTexts:
    """The texts both models read, in row order.

    Attributes:
        texts: task prompts first, then corpus passages.
        sources: per text, "task:<name>" or "corpus".
        n_prompts_available: distinct task prompts in the union before the word budget.
    """

    texts: list[str]
    sources: list[str]
    n_prompts_available: int


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the words (maximal runs of non-space characters) of `text`."""
    return [m.span() for m in _WORD.finditer(text)]


def _as_paths(paths: Sequence[Path] | Path | str | None) -> list[Path]:
    if paths is None:
        return []
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def task_prompt_union(datasets_a: Sequence[Path] | Path | None, datasets_b: Sequence[Path] | Path | None
                      ) -> list[tuple[str, str]]:
    """(task, prompt) of both runs' datasets: per task, A's prompts then B's that A lacks.

    Tasks are matched by folder name (`results/<run>/tasks/<task>/dataset.jsonl`); the union, not
    the intersection, since task builders keep only single-token names, so different tokenizers
    draw different prompts (as in `stage.cka_prompt_texts`).
    """
    from mechflow.tasks.dataset import TaskDataset

    by_task: dict[str, dict[str, None]] = {}
    for path in [*_as_paths(datasets_a), *_as_paths(datasets_b)]:
        prompts = by_task.setdefault(path.parent.name, {})
        prompts.update(dict.fromkeys(it.prompt for it in TaskDataset.load(path).examples))
    return [(task, p) for task in sorted(by_task) for p in by_task[task]]


def corpus_passages(documents: Iterable[str], *, max_words: int, passage_words: int, stride: int = 1
                    ) -> list[str]:
    """Every `stride`-th passage of at most `passage_words` words of `documents`, `max_words` words in all.

    A stride > 1 spreads the passages over more documents (topics) of the stream's start.
    """
    out: list[str] = []
    left, n = max_words, 0
    for doc in documents:
        spans = word_spans(doc)
        for s in range(0, len(spans), passage_words):
            if left <= 0:
                return out
            n += 1
            if (n - 1) % stride:
                continue
            chunk = spans[s:s + min(passage_words, left)]
            out.append(doc[chunk[0][0]:chunk[-1][1]])
            left -= len(chunk)
    return out


def shared_texts(datasets_a: Sequence[Path] | Path | None, datasets_b: Sequence[Path] | Path | None,
                 corpus_cfg: Mapping[str, Any] | None, *, task_words: int, corpus_words: int,
                 passage_words: int, seed: int, stride: int = 1) -> SharedTexts:
    """Module step 1: a seeded sample of whole task prompts, then the first corpus passages."""
    prompts = task_prompt_union(datasets_a, datasets_b)
    order = np.random.default_rng(seed).permutation(len(prompts))
    texts, sources, used = [], [], 0
    for i in order:
        task, prompt = prompts[i]
        n = len(word_spans(prompt))
        if used + n > task_words:
            continue
        texts.append(prompt)
        sources.append(f"task:{task}")
        used += n
    if corpus_cfg is not None and corpus_words > 0:
        from mechflow.corpus.config import CorpusConfig
        from mechflow.corpus.core import iter_documents

        passages = corpus_passages(iter_documents(CorpusConfig.from_dict(dict(corpus_cfg))),
                                   max_words=corpus_words, passage_words=passage_words, stride=stride)
        texts += passages
        sources += ["corpus"] * len(passages)
    if not texts:
        raise DataError("feature matching: no shared texts (no task prompt fits task_words and no corpus "
                        "passage); select tasks or give the corpus config")
    return SharedTexts(texts, sources, len(prompts))


# ----------------------------------------------------------------------------- 2. activation profiles


@dataclass(frozen=True)
class ModelSide:
    """One model of the pair as the stage reads it.

    Attributes:
        name: the model's config name (checked against the SAE's `training.json`).
        model: a HookedTransformer.
        tokenizer: a fast tokenizer: ``tokenizer(text, add_special_tokens=False,
            return_offsets_mapping=True)`` and ``convert_ids_to_tokens(ids)``.
        prepend_bos / bos_token_id: the model's BOS convention.
    """

    name: str
    model: Any
    tokenizer: Any
    prepend_bos: bool
    bos_token_id: int | None

    @classmethod
    def load(cls, model_cfg: Mapping[str, Any]) -> ModelSide:
        from mechflow.models import load_model_from_cfg

        loaded = load_model_from_cfg(dict(model_cfg))
        return cls(loaded.card.name, loaded.model, loaded.tokenizer, loaded.card.prepend_bos,
                   loaded.card.bos_token_id)


@dataclass(frozen=True)
class Tokenized:
    """One text for one model: token ids (BOS first when the model prepends it) and the
    (word, token) pairs whose spans overlap; token indices count the text's tokens, BOS excluded."""

    ids: list[int]
    word: np.ndarray
    token: np.ndarray


def tokenize_words(side: ModelSide, text: str, spans: Sequence[tuple[int, int]]) -> Tokenized:
    """Tokenize `text` with the model's convention and map its tokens to the words of `spans`."""
    try:
        enc = side.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:  # slow (Python) tokenizers have no offset mapping
        raise ConfigError(f"feature matching needs a fast tokenizer (offset mapping) for {side.name}: {exc}") from exc
    ids = list(enc["input_ids"])
    off = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    if len(off) != len(ids):
        raise DataError(f"{side.name} tokenizer returned {len(off)} offsets for {len(ids)} tokens of {text[:40]!r}")
    s = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    overlap = ((off[None, :, 0] < s[:, None, 1]) & (off[None, :, 1] > s[:, None, 0])
               & (off[None, :, 1] > off[None, :, 0]))
    word, token = np.nonzero(overlap)
    if side.prepend_bos:
        if side.bos_token_id is None:
            raise ConfigError(f"model.prepend_bos is set but {side.name} has no BOS token id")
        ids = [int(side.bos_token_id), *ids]
    return Tokenized(ids, word, token)


def _load_sae(training: Path, side: ModelSide) -> tuple[Any, str]:
    """The SAE of `training` (its folder, written by `train_sae`) and its hook, checked against the model."""
    from mechflow.dictionaries.features import check_sae
    from mechflow.dictionaries.sae import load_sae

    folder = Path(training).parent
    if not (folder / "cfg.json").is_file():
        raise DataError(f"SAE folder {folder} does not exist or has no cfg.json: run the train_sae stage for "
                        f"{side.name} (feature matching needs an SAE for both models of the pair)")
    sae = load_sae(folder)
    sae.eval()
    check_sae(sae, folder)
    meta = sae.cfg.metadata
    trained_on = getattr(meta, "model_name", None)
    if Path(training).is_file():
        trained_on = load_document(training, DictionaryTraining, fix="re-run train_sae", partial=True
                                   ).get("model", trained_on)
    if trained_on and trained_on != side.name:
        raise ConfigError(f"SAE {folder} was trained on {trained_on!r}, not {side.name!r}: pass each model's own "
                          "SAE (results/<run>/dictionaries/sae of the run with that model)")
    hook = getattr(meta, "hook_name", None)
    if not hook:
        raise DataError(f"SAE {folder}: cfg.json names no hook (metadata.hook_name); re-run train_sae")
    return sae, hook


@torch.no_grad()
def pooled_profile(side: ModelSide, tokenized: Sequence[Tokenized], n_words: Sequence[int],
                   latents: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 16, label: str = ""
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``[sum(n_words), f]`` float32 word maxima of `latents` (token ids ``[b, pos]`` -> ``[b, text
    tokens, f]``), and the mask of words that got at least one token.

    Texts of equal token length are batched (no padding, so every position is exact).
    """
    offsets = np.concatenate([[0], np.cumsum(n_words)]).astype(np.int64)
    out: np.ndarray | None = None
    seen = np.zeros(int(offsets[-1]), dtype=bool)
    n_ctx = side.model.cfg.n_ctx
    by_len: dict[int, list[int]] = {}
    for i, tk in enumerate(tokenized):
        if len(tk.ids) > n_ctx:
            raise ConfigError(f"a shared text of {len(tk.ids)} tokens exceeds {side.name}'s n_ctx={n_ctx}; "
                              "use shorter passages (passage_words)")
        by_len.setdefault(len(tk.ids), []).append(i)
    bar = tqdm(total=len(tokenized), desc=label or "activations", unit="text")
    for rows_all in by_len.values():
        for s in range(0, len(rows_all), batch_size):
            rows = rows_all[s:s + batch_size]
            lat = latents(torch.tensor([tokenized[i].ids for i in rows], device=side.model.cfg.device))
            if out is None:
                out = np.zeros((int(offsets[-1]), lat.shape[-1]), dtype=np.float32)
            for k, i in enumerate(rows):
                tk = tokenized[i]
                if not len(tk.word):
                    continue
                src = lat[k, torch.from_numpy(tk.token)]
                index = torch.from_numpy(tk.word).to(src.device)[:, None].expand_as(src)
                pooled = torch.full((n_words[i], src.shape[1]), float("-inf"), dtype=src.dtype, device=src.device)
                pooled.scatter_reduce_(0, index, src, "amax")
                hit = np.zeros(n_words[i], dtype=bool)
                hit[tk.word] = True
                out[offsets[i]:offsets[i + 1]][hit] = pooled[torch.from_numpy(hit)].float().cpu().numpy()
                seen[offsets[i]:offsets[i + 1]] = hit
            bar.update(len(rows))
    bar.close()
    if out is None:
        raise DataError(f"feature matching: no shared text to read for {side.name}")
    return out, seen


def activation_profile(spliced: Any, side: ModelSide, tokenized: Sequence[Tokenized], n_words: Sequence[int],
                       batch_size: int = 16, label: str = "") -> tuple[np.ndarray, np.ndarray, float]:
    """Module step 2 for the SAE's latents: (profile, words with tokens, mean L0 per text token)."""
    count = {"active": 0, "tokens": 0}

    def latents(tokens: torch.Tensor) -> torch.Tensor:
        _, lat = spliced.latents(tokens)  # [b, pos - start, d_sae]: positions of the text tokens
        count["active"] += int((lat != 0).sum())
        count["tokens"] += lat.shape[0] * lat.shape[1]
        return lat

    P, seen = pooled_profile(side, tokenized, n_words, latents, batch_size, f"activations {label}".strip())
    return P, seen, count["active"] / max(count["tokens"], 1)


def control_activation_profile(spliced: Any, side: ModelSide, tokenized: Sequence[Tokenized],
                               n_words: Sequence[int], directions: torch.Tensor, k: int, batch_size: int = 16
                               ) -> np.ndarray:
    """Control latents: the top-k of ReLU(x . r_j) over random unit directions r_j (columns of
    `directions` ``[d_in, f]``) at the SAE's hook: sparse features of the same input that no
    training aligned with anything, pooled per word like the SAE's."""
    b_dec = getattr(spliced.sae, "b_dec", None)
    center = torch.zeros(directions.shape[0], dtype=directions.dtype) if b_dec is None else b_dec.to(directions.dtype)

    def latents(tokens: torch.Tensor) -> torch.Tensor:
        act, _ = spliced.latents(tokens)  # x - b_dec, as the SAE's encoder reads it
        pre = torch.relu((act[:, spliced.start:].to(directions.dtype) - center) @ directions)
        top = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, top.values)

    return pooled_profile(side, tokenized, n_words, latents, batch_size, "control activations")[0]


def random_directions(n: int, d: int, seed: np.random.SeedSequence) -> torch.Tensor:
    """``[n, d]`` float32 rows uniform on the unit sphere (seeded)."""
    g = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return torch.from_numpy(g / np.linalg.norm(g, axis=1, keepdims=True))


# ----------------------------------------------------------------------------- 3. logit-effect profiles


def vocabulary(side: ModelSide, tag: str) -> list[str]:
    """Token strings by id over the model's d_vocab; special and unknown ids get strings no other side has."""
    d_vocab = side.model.cfg.d_vocab
    toks = side.tokenizer.convert_ids_to_tokens(list(range(d_vocab)))
    special = set(getattr(side.tokenizer, "all_special_ids", []) or [])
    return [f"\x00{tag}{i}" if t is None or i in special else str(t) for i, t in enumerate(toks)]


@dataclass
class _SharedUnembed:
    """What `unembed_directions` reads of a model, with W_U cut to the shared token ids."""

    cfg: Any
    ln_final: Any
    W_U: torch.Tensor


@torch.no_grad()
def logit_profile(model: Any, decoder: torch.Tensor, token_ids: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Module step 3: ``[len(token_ids), d_sae]`` float32 direct logit effect of each latent on each token."""
    from mechflow.dictionaries.features import unembed_directions

    cut = _SharedUnembed(model.cfg, getattr(model, "ln_final", None),
                         model.W_U[:, torch.as_tensor(token_ids, dtype=torch.long)])
    out = np.empty((len(token_ids), decoder.shape[0]), dtype=np.float32)
    for a in range(0, decoder.shape[0], chunk):
        out[:, a:a + chunk] = unembed_directions(cut, decoder[a:a + chunk]).T.float().cpu().numpy()
    return out


def is_residual(hook: str, sae: Any, model: Any) -> bool:
    """Whether the hook's activations live in the residual basis W_U reads (else no logit effects)."""
    from mechflow.dictionaries.features import RESIDUAL_HOOK

    return bool(RESIDUAL_HOOK.search(hook)) and sae.cfg.d_in == model.cfg.d_model


# ----------------------------------------------------------------------------- 4. matching


def _live(P: np.ndarray, min_active: int = 0) -> np.ndarray:
    """Columns that vary, and (with `min_active`) are non-zero on at least that many rows."""
    live = P.max(axis=0) > P.min(axis=0)
    return live & ((P != 0).sum(axis=0) >= min_active) if min_active else live


def _quantiles(x: np.ndarray) -> dict[str, float]:
    return {f"q{q:g}": float(np.quantile(x, q)) for q in QUANTILES} if x.size else {}


def _pair_corr(P_a: np.ndarray, P_b: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
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


def match_profile(kind: str, P_a: np.ndarray, P_b: np.ndarray, scfg: StatsConfig,
                  rng: np.random.Generator, min_active: int = 0) -> ProfileMatch:
    """Module step 4 for one profile: drop constant (and rarely active) latents, then `match_features`."""
    live_a, live_b = np.flatnonzero(_live(P_a, min_active)), np.flatnonzero(_live(P_b, min_active))
    if len(live_a) == 0 or len(live_b) == 0:
        side = "A" if len(live_a) == 0 else "B"
        raise DataError(f"feature matching ({kind} profile): no latent of model {side}'s SAE varies over the "
                        f"{P_a.shape[0]} shared rows" + (f" on at least {min_active} of them" if min_active else "")
                        + "; check the SAE (train_sae), give more texts or lower min_active_words")
    t0 = time.perf_counter()
    res = match_features(P_a[:, live_a], P_b[:, live_b], n_permutations=scfg.feature_n_permutations,
                         null=scfg.feature_null, seed=rng)
    logger.info("%s profile: %d x %d live latents on %d rows matched in %.1fs", kind, len(live_a), len(live_b),
                P_a.shape[0], time.perf_counter() - t0)
    return ProfileMatch(kind, P_a.shape[0], live_a, live_b, res, min_active)


def control_best(P_a: np.ndarray, P_control: np.ndarray, min_active: int = 0) -> np.ndarray:
    """Best correlation of each column of `P_a` with the live columns of `P_control` (as `match_profile`)."""
    from mechflow.stats.feature_matching import correlation_matrix

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


# ----------------------------------------------------------------------------- the stage


def _top_words(P: np.ndarray, words: Sequence[str], f: int, n: int = 5) -> list[str]:
    col = P[:, f]
    out: list[str] = []
    for r in np.argsort(-col, kind="stable"):
        if col[r] <= 0 or len(out) == n:
            break
        if words[r] not in out:
            out.append(words[r])
    return out


def _top_tokens(side: ModelSide, decoder: torch.Tensor, features: Sequence[int], n: int
                ) -> dict[int, list[str]]:
    from mechflow.dictionaries.features import logit_effects

    fx = logit_effects(side.model, decoder, sorted({int(f) for f in features}), n)
    return {f: [normalize_token(t) for t in side.tokenizer.convert_ids_to_tokens([i for i, _ in v["promoted"]])]
            for f, v in fx.items()}


def run_feature_matching(
    cfg: StatsConfig | Mapping[str, Any] | None,
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
        cfg: the `stats` group (reads seed, feature_null, feature_n_permutations).
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
    scfg = StatsConfig.from_dict(cfg)  # a StatsConfig passes through; None: the defaults
    _check_counts(task_words=task_words, corpus_words=corpus_words, min_active_words=min_active_words,
                  passage_words=passage_words, passage_stride=passage_stride, max_vocab=max_vocab, n_top=n_top,
                  batch_size=batch_size)
    seeds = np.random.SeedSequence(scfg.seed).spawn(6)
    t0 = time.perf_counter()
    if texts is None:
        st = shared_texts(datasets_a, datasets_b, corpus_cfg, task_words=task_words, corpus_words=corpus_words,
                          passage_words=passage_words, seed=int(seeds[0].generate_state(1)[0]),
                          stride=passage_stride)
    else:
        st = SharedTexts([str(t) for t in texts], ["given"] * len(texts), 0)
    if sides is None:
        sides = _load_sides(training_a, training_b, model_cfg_a, model_cfg_b)
    acts = _activation_step(st, sides, (Path(training_a), Path(training_b)), scfg, seeds, min_active_words,
                            batch_size)
    logit = _logit_step(acts, scfg, seeds, max_vocab)
    doc = _document(scfg, acts, logit, n_top, Path(training_a).parent, Path(training_b).parent)
    doc["seconds"] = {**acts.seconds, **(logit.seconds if logit else {}), "total": time.perf_counter() - t0}
    return _write(doc, Path(matching), Path(summary), Path(figure))


def _check_counts(**counts: Any) -> None:
    for name, v in counts.items():
        low = 0 if name in ("task_words", "corpus_words", "min_active_words") else 1
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ConfigError(f"feature matching: {name}={v!r} must be an integer >= {low}")


def _load_sides(training_a: Path, training_b: Path, model_cfg_a: Mapping[str, Any] | None,
                model_cfg_b: Mapping[str, Any] | None) -> tuple[ModelSide, ModelSide]:
    if model_cfg_a is None or model_cfg_b is None:
        raise ConfigError("run_feature_matching needs model_cfg_a and model_cfg_b (the `model` groups of the "
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


def _activation_step(st: SharedTexts, sides: tuple[ModelSide, ModelSide], trainings: tuple[Path, Path],
                     scfg: StatsConfig, seeds: Sequence[np.random.SeedSequence], min_active: int, batch_size: int
                     ) -> ActivationStep:
    """Module steps 2, 4 and 5 for the activation profile."""
    from mechflow.dictionaries.features import SplicedSAE

    spans = [word_spans(t) for t in st.texts]
    n_words = [len(s) for s in spans]
    seconds: dict[str, float] = {}
    P, seen, spliced, hooks, residual, tokenized, l0 = [], [], [], [], [], [], []
    for tag, side, training in zip("ab", sides, trainings):
        t = time.perf_counter()
        sae, hook = _load_sae(training, side)
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
    match = match_profile("activation", P_a, P_b, scfg, np.random.default_rng(seeds[1]), min_active)
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


def _logit_step(acts: ActivationStep, scfg: StatsConfig, seeds: Sequence[np.random.SeedSequence],
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
    match = match_profile("logit", L[0], L[1], scfg, np.random.default_rng(seeds[3]))
    seconds["match_logit"] = time.perf_counter() - t
    d_sae_b = spliced[1].decoder.shape[0]
    dirs = random_directions(d_sae_b, spliced[1].decoder.shape[1], seeds[5]).to(spliced[1].decoder.dtype)
    match.control = control_best(L[0][:, match.live_a], logit_profile(sides[1].model, dirs, ids_b))
    match.control_info = {"latents": f"{d_sae_b} random unit decoder directions in {sides[1].name}'s residual "
                                     "stream, through its final norm and W_U"}
    vocab = {"n_shared": n_shared, "n_used": len(strings), "max_vocab": max_vocab,
             "examples": strings[:: max(1, len(strings) // 20)][:20]}
    return LogitStep(vocab, L, match, seconds)


def _document(scfg: StatsConfig, acts: ActivationStep, logit: LogitStep | None, n_top: int, dict_a: Path,
              dict_b: Path) -> dict[str, Any]:
    """feature_matching.json: settings, texts, both profiles' matchings, top pairs, agreement."""
    st, sides, d_sae = acts.texts, acts.sides, acts.d_sae
    steps = {"activation": (acts.match, acts.profiles)} | (
        {"logit": (logit.match, logit.profiles)} if logit is not None else {})
    tops = {kind: tuple(x[:n_top] for x in pm.pairs()) for kind, (pm, _) in steps.items()}
    tokens: list[dict[int, list[str]]] = [{}, {}]
    if logit is not None:
        for s in range(2):
            tokens[s] = _top_tokens(sides[s], acts.spliced[s].decoder, [f for t in tops.values() for f in t[s]], 5)
    doc: dict[str, Any] = {
        "stage": "feature_matching", "definition": DEFINITION,
        "model_a": sides[0].name, "model_b": sides[1].name, "hook_a": acts.hooks[0], "hook_b": acts.hooks[1],
        "d_sae_a": d_sae[0], "d_sae_b": d_sae[1], "dictionary_a": str(dict_a), "dictionary_b": str(dict_b),
        "null_kind": scfg.feature_null, "n_permutations": scfg.feature_n_permutations, "seed": scfg.seed,
        "texts": {"n_texts": len(st.texts), "n_task_prompts": sum(s.startswith("task:") for s in st.sources),
                  "n_task_prompts_available": st.n_prompts_available,
                  "n_corpus_passages": st.sources.count("corpus"),
                  "tasks": sorted({s[5:] for s in st.sources if s.startswith("task:")}),
                  "n_words": int(acts.keep.size), "n_words_used": int(acts.keep.sum()),
                  "n_words_dropped": int((~acts.keep).sum())},
        "vocabulary": logit.vocabulary if logit is not None else None,
        "logit_effects": logit is not None,
    }
    P = acts.profiles
    for kind, (pm, _) in steps.items():
        block = profile_document(pm, *d_sae)
        other = "logit" if kind == "activation" else "activation"
        a, b, c = tops[kind]
        other_corr = _pair_corr(*steps[other][1], a, b) if other in steps else None
        p_of = dict(zip(pm.live_a.tolist(), pm.res.p_value.tolist()))
        best_of = dict(zip(pm.live_a.tolist(), pm.live_b[pm.res.best_b].tolist()))
        block["top_pairs"] = [
            {"a": int(i), "b": int(j), "corr": float(cc), "p_value": p_of[int(i)],
             "is_best_match": bool(best_of[int(i)] == j),
             f"corr_{other}": None if other_corr is None else float(other_corr[k]),
             "tokens_a": tokens[0].get(int(i), []), "tokens_b": tokens[1].get(int(j), []),
             "words_a": _top_words(P[0], acts.words, int(i)), "words_b": _top_words(P[1], acts.words, int(j))}
            for k, (i, j, cc) in enumerate(zip(a, b, c))]
        doc[kind] = block
    if logit is not None:
        doc["agreement"] = _agreement(doc, acts.match.threshold, logit.match.threshold, d_sae)
    return doc


def _agreement(doc: dict[str, Any], thr_act: float, thr_logit: float, d_sae: tuple[int, int]) -> dict[str, Any]:
    """Hungarian pairs found by both profiles (chance: |pairs_act| |pairs_logit| / (d_sae_a d_sae_b))."""
    corr = {kind: {(i, j): c for i, j, c in zip(*(doc[kind]["pairs"][k] for k in ("a", "b", "corr")))}
            for kind in ("activation", "logit")}
    both = set(corr["activation"]) & set(corr["logit"])
    return {"n_same_pairs": len(both),
            "n_same_pairs_matched_in_both": sum(corr["activation"][p] > thr_act and corr["logit"][p] > thr_logit
                                                for p in both),
            "n_same_pairs_expected_by_chance": len(corr["activation"]) * len(corr["logit"])
            / max(1, d_sae[0] * d_sae[1])}


def _plot(doc: dict[str, Any], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kinds = [k for k in ("activation", "logit") if k in doc]
    fig = Figure(figsize=(5 * len(kinds), 3.4))
    FigureCanvasAgg(fig)
    for n, kind in enumerate(kinds):
        b = doc[kind]
        ax = fig.add_subplot(1, len(kinds), n + 1)
        edges = np.asarray(b["hist"]["edges"])
        obs, null = np.asarray(b["hist"]["observed"], float), np.asarray(b["hist"]["null"], float)
        ax.stairs(null / max(null.sum(), 1), edges, fill=True, color="lightgrey", label=f"null ({doc['null_kind']})")
        ax.stairs(obs / max(obs.sum(), 1), edges, color="tab:blue", lw=1.5, label="observed best match")
        if "control" in b["hist"]:
            ctrl = np.asarray(b["hist"]["control"], float)
            ax.stairs(ctrl / max(ctrl.sum(), 1), edges, color="tab:orange", lw=1.2, ls=":",
                      label="control: random directions in B")
        ax.axvline(b["threshold"], color="tab:red", ls="--",
                   label=f"null q{THRESHOLD_QUANTILE:g} = {b['threshold']:.3f}")
        ax.set_title(f"{kind}: {b['n_matched']}/{b['n_live_a']} matched ({b['n_rows']} rows)", fontsize=9)
        ax.set_xlabel("best-match correlation")
        ax.set_ylabel("fraction of latents")
        ax.legend(fontsize=7)
    fig.suptitle(f"SAE features: {doc['model_a']} {doc['hook_a']} vs {doc['model_b']} {doc['hook_b']}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def _md_tokens(xs: Sequence[str]) -> str:
    return " ".join("`" + x.replace("`", "'").replace("|", "\\|").replace("\n", "\\n") + "`" for x in xs) or "—"


def feature_matching_markdown(doc: dict[str, Any]) -> str:
    """feature_matching.md: the headline table and the top matched pairs of each profile."""
    t = doc["texts"]
    lines = [f"# Cross-model SAE feature matching: {doc['model_a']} vs {doc['model_b']}", "",
             (f"SAEs: {doc['model_a']} `{doc['hook_a']}` (d_sae {doc['d_sae_a']}), {doc['model_b']} "
              f"`{doc['hook_b']}` (d_sae {doc['d_sae_b']}). Null: {doc['null_kind']}, "
              f"{doc['n_permutations']} draws, seed {doc['seed']}."), "",
             (f"Shared texts: {t['n_texts']} ({t['n_task_prompts']} task prompts of "
              f"{', '.join(t['tasks']) or 'no task'}, {t['n_corpus_passages']} corpus passages); "
              f"{t['n_words_used']} words (rows of the activation profile; {t['n_words_dropped']} dropped: no "
              "token in one model).")]
    if doc.get("vocabulary"):
        v = doc["vocabulary"]
        lines.append(f"Logit-effect profile: {v['n_used']} of {v['n_shared']} token strings in both vocabularies.")
    lines += ["", doc["definition"] + ".", "",
              ("| profile | rows | live A / B | null q0.99 | matched (best corr > q0.99) | expected by chance | "
               "control matched | matched > control q0.99 | Hungarian pairs > q0.99 | median best corr | "
               "null median |"),
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in ("activation", "logit"):
        if kind not in doc:
            continue
        b = doc[kind]
        lines.append(f"| {kind} | {b['n_rows']} | {b['n_live_a']} / {b['n_live_b']} | {b['threshold']:.3f} | "
                     f"{b['n_matched']} ({100 * b['fraction_matched']:.1f}%) | {b['n_expected_by_chance']:.1f} | "
                     f"{'—' if not b.get('control') else b['control']['n_matched']} | "
                     f"{'—' if not b.get('control') else b['control']['n_matched_above_control']} | "
                     f"{b['n_pairs_matched']} | {b['best_corr_quantiles'].get('q0.5', float('nan')):.3f} | "
                     f"{b['null_quantiles'].get('q0.5', float('nan')):.3f} |")
    lines += ["", ("Live: latents that vary over the rows (activation: active on at least "
                   f"{doc['activation']['min_active']} words). "
                   "Expected by chance: 1% of A's live latents, if rows were exchangeable. Control: A's latents "
                   "matched against random sparse directions of B instead of B's SAE (same threshold); it shows "
                   "how many matches the shared input alone produces (e.g. both models see the same frequent "
                   "words), which the permutation null does not remove; \"matched > control q0.99\" counts A's "
                   "latents whose best match in B's SAE beats 99% of A's best matches among the random "
                   "directions.")]
    if "agreement" in doc:
        g = doc["agreement"]
        lines += ["", (f"Same Hungarian pair in both profiles: {g['n_same_pairs']} (chance: "
                       f"{g['n_same_pairs_expected_by_chance']:.1f}); matched in both: "
                       f"{g['n_same_pairs_matched_in_both']}.")]
    for kind in ("activation", "logit"):
        if kind not in doc:
            continue
        other = "logit" if kind == "activation" else "activation"
        lines += ["", f"## Top pairs by {kind} correlation", "",
                  f"| A | B | corr | p | corr ({other}) | A promotes | B promotes | A fires on | B fires on |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in doc[kind]["top_pairs"]:
            oc = r.get(f"corr_{other}")
            lines.append(f"| {r['a']} | {r['b']} | {r['corr']:.3f} | {r['p_value']:.3g} | "
                         f"{'—' if oc is None else format(oc, '.3f')} | {_md_tokens(r['tokens_a'])} | "
                         f"{_md_tokens(r['tokens_b'])} | {_md_tokens(r['words_a'])} | {_md_tokens(r['words_b'])} |")
    return "\n".join(lines) + "\n"


def _write(doc: dict[str, Any], matching: Path, summary: Path, figure: Path) -> dict[str, Any]:
    paths = {"feature_matching.png": _plot(doc, figure),
             "feature_matching.md": atomic_write_text(summary, feature_matching_markdown(doc)),
             "feature_matching.json": write_document(matching, FeatureMatchingDocument, doc)}
    headline: dict[str, Any] = {"model_a": doc["model_a"], "model_b": doc["model_b"],
                                "n_words": doc["texts"]["n_words_used"]}
    for kind in ("activation", "logit"):
        if kind in doc:
            headline[f"{kind}_matched"] = doc[kind]["n_matched"]
            headline[f"{kind}_live_a"] = doc[kind]["n_live_a"]
            headline[f"{kind}_threshold"] = doc[kind]["threshold"]
            if doc[kind].get("control"):
                headline[f"{kind}_control_matched"] = doc[kind]["control"]["n_matched"]
    headline["outputs"] = {k: str(v) for k, v in paths.items()}
    logger.info("feature matching %s vs %s: %s", doc["model_a"], doc["model_b"],
                {k: v for k, v in headline.items() if k != "outputs"})
    return headline
