"""Steps 2-3 of cross-model feature matching: each SAE latent's fingerprints on the shared inputs.

2. Activation profiles P [n_words, d_sae]: a word's value for a latent is the maximum of the latent
   over the tokens overlapping the word (`mechflow.features.texts`), so different tokenizations
   meet at the word. Words that one tokenizer drops are left out of both profiles. Control
   profiles (random sparse directions at the same hook) are pooled the same way.
3. Logit-effect profiles [n_tokens, d_sae]: each latent's decoder direction through the final norm
   and W_U (`mechflow.features.logits.unembed_directions`, direct path), on the token strings both
   vocabularies hold; W_U is cut to those columns before the product, so the 262k-token Gemma
   vocabulary never meets d_sae in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mechflow.contracts.dictionaries import DictionaryTraining
from mechflow.contracts.documents import load_document
from mechflow.contracts.hooks import RESIDUAL_HOOK
from mechflow.errors import ConfigError, DataError
from mechflow.features.attribution import check_sae
from mechflow.features.logits import unembed_directions
from mechflow.features.texts import ModelSide, Tokenized


def load_side_sae(training: Path, side: ModelSide) -> tuple[Any, str]:
    """The SAE of `training` (its folder, written by `train_sae`) and its hook, checked against the model."""
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
    cut = _SharedUnembed(model.cfg, getattr(model, "ln_final", None),
                         model.W_U[:, torch.as_tensor(token_ids, dtype=torch.long)])
    out = np.empty((len(token_ids), decoder.shape[0]), dtype=np.float32)
    for a in range(0, decoder.shape[0], chunk):
        out[:, a:a + chunk] = unembed_directions(cut, decoder[a:a + chunk]).T.float().cpu().numpy()
    return out


def is_residual(hook: str, sae: Any, model: Any) -> bool:
    """Whether the hook's activations live in the residual basis W_U reads (else no logit effects)."""
    return bool(RESIDUAL_HOOK.search(hook)) and sae.cfg.d_in == model.cfg.d_model
