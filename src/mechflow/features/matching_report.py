"""Step 6 of cross-model feature matching: `feature_matching.json` (every number, a
`FeatureMatchingDocument`), `feature_matching.md` (the headline table and the top matched pairs of
each profile) and `feature_matching.png` (observed best-match correlations vs the null, per
profile), each written atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mechflow.contracts.documents import write_document
from mechflow.contracts.stats import FeatureMatchingDocument
from mechflow.features.config import FeatureMatchingConfig
from mechflow.features.logits import logit_effects
from mechflow.features.matching import normalize_token
from mechflow.features.matching_steps import ActivationStep, LogitStep
from mechflow.features.profile_match import THRESHOLD_QUANTILE, pair_correlation, profile_document
from mechflow.features.texts import ModelSide
from mechflow.io import atomic_write_text
from mechflow.plotting import save_figure

logger = logging.getLogger(__name__)

DEFINITION = (
    "Each SAE latent is fingerprinted by (i) its activation on the words of shared texts (max over the "
    "model's tokens overlapping the word) and (ii) its direct logit effect on token strings in both "
    "vocabularies; latents of A and B are compared by Pearson correlation of fingerprints. best_corr: "
    "max over B's latents; null: the same maximum after permuting B's rows (feature_matching.null_kind); "
    "matched: best_corr > the 0.99 quantile of the pooled null; pairs: optimal one-to-one (Hungarian) "
    "matching (mechflow.features.matching_stage)")


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
    fx = logit_effects(side.model, decoder, sorted({int(f) for f in features}), n)
    return {f: [normalize_token(t) for t in side.tokenizer.convert_ids_to_tokens([i for i, _ in v["promoted"]])]
            for f, v in fx.items()}



def matching_document(cfg: FeatureMatchingConfig, acts: ActivationStep, logit: LogitStep | None, n_top: int,
                      dict_a: Path, dict_b: Path) -> dict[str, Any]:
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
        "null_kind": cfg.null_kind, "n_permutations": cfg.n_permutations, "seed": cfg.seed,
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
        other_corr = pair_correlation(*steps[other][1], a, b) if other in steps else None
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
    save_figure(fig, path, dpi=120)
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


def write_matching(doc: dict[str, Any], matching: Path, summary: Path, figure: Path) -> dict[str, Any]:
    """The three outputs, each written atomically; returns the headline numbers and the paths."""
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
