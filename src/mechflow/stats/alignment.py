"""Comparing two models on the same task: FCAS's inputs and document, CKA's prompts and activations.

FCAS (`mechflow.stats.fcas`) matches the top-k components of the two models by the mean
exact-patching score (`exact_components`); `fcas_document` is `fcas.json`. Linear CKA by relative
depth (Kornblith et al. 2019, `mechflow.stats.cka`) compares the residual streams at the last
prompt token on the union of both task datasets' prompt texts (`cka_prompt_texts`), each model
reading every text with its own tokenization (`representation_cka`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mechflow.contracts.models import ModelCard
from mechflow.errors import ConfigError, DataError
from mechflow.stats.cka import DepthCKA, cka_by_depth
from mechflow.stats.config import StatsConfig
from mechflow.stats.fcas import FCASResult, ModelComponents
from mechflow.stats.output import nan_to_none
from mechflow.stats.readers import NodeScores

MIN_CKA_PROMPTS = 8


def exact_components(ns: NodeScores, path: Path, n_layers: int, labels: np.ndarray) -> ModelComponents:
    """One model's components for FCAS: the mean exact-patching score of each, with `labels`."""
    if "exact" not in ns.methods:
        raise DataError(f"{path}: no rows with method 'exact'; FCAS uses exact-patching scores "
                        "(re-run the circuits stage with exact patching)")
    return ModelComponents(ns.mean("exact"), ns.layer, n_layers, labels, list(ns.components))


FCAS_DEFINITION = (
    "FCAS = (1/k) max over one-to-one matchings of sum sim(a, b) between the top-k components (by |mean "
    "exact-patching score|) of each model; sim = (1 - |d_a - d_b|) [label_a == label_b] [sign_a == sign_b], "
    "d = (layer + 0.5) / n_layers (mechflow.stats.fcas)")


def fcas_document(res: FCASResult, a: ModelComponents, b: ModelComponents, card_a: ModelCard, card_b: ModelCard,
                  scfg: StatsConfig, label_source: str) -> dict[str, Any]:
    """fcas.json: definition, observed score, matching, null and p-values."""
    def side(mc: ModelComponents, i: int) -> dict[str, Any]:
        return {"component": mc.names[i], "layer": int(mc.layer[i]), "depth": float(mc.depth[i]),
                "label": str(mc.label[i]), "score": float(mc.attribution[i])}

    null = res.null
    return nan_to_none({
        "definition": FCAS_DEFINITION, "attribution": "mean over prompts of the exact-patching score (signed)",
        "model_a": card_a.name, "model_b": card_b.name, "n_layers_a": card_a.n_layers, "n_layers_b": card_b.n_layers,
        "labels": label_source, "k": res.k, "score": res.score,
        "pairs": [{"a": side(a, i), "b": side(b, j), "similarity": s} for i, j, s in res.pairs],
        "null_kind": res.null_kind, "n_permutations": int(null.size), "seed": scfg.seed,
        "p_value": res.p_value, "p_value_randomized": res.p_value_randomized, "z": res.z,
        "null_mean": float(null.mean()), "null_std": float(null.std(ddof=1)) if null.size > 1 else None,
        "null_quantiles": {f"q{q:g}": float(np.quantile(null, q)) for q in scfg.quantiles},
    })


@dataclass(frozen=True)
class CKAPrompts:
    """The prompt texts both models read for CKA.

    Attributes:
        texts: A's unique prompt texts, then B's that A lacks (the union, deterministic order).
        n_a / n_b: unique prompt texts in each dataset; n_shared: texts in both.
    """

    texts: list[str]
    n_a: int
    n_b: int
    n_shared: int


def cka_prompt_texts(dataset_a: Path, dataset_b: Path) -> CKAPrompts:
    """The union of both task datasets' prompt texts (at least `MIN_CKA_PROMPTS`).

    Both models read every text, each tokenized with its own convention, so row i of both
    activation matrices is the same text. The union, not the intersection: task builders keep
    only names that are one token for the model's tokenizer, so with different tokenizers the
    same seed draws different prompts (IOI, 12 prompts: SmolLM2 and Gemma-3 share none).
    """
    from mechflow.tasks.dataset import TaskDataset

    ta = list(dict.fromkeys(it.prompt for it in TaskDataset.load(dataset_a).examples))
    tb = list(dict.fromkeys(it.prompt for it in TaskDataset.load(dataset_b).examples))
    in_a = set(ta)
    union = ta + [t for t in tb if t not in in_a]
    if len(union) < MIN_CKA_PROMPTS:
        raise DataError(f"{dataset_a} and {dataset_b} hold {len(union)} distinct prompt text(s) ({len(ta)} and "
                        f"{len(tb)}); CKA needs at least {MIN_CKA_PROMPTS}: raise the task's n_prompts")
    return CKAPrompts(union, len(ta), len(tb), sum(t in in_a for t in tb))


def last_token_residuals(loaded: Any, token_ids: Sequence[Sequence[int]],
                         batch_size: int = 32) -> dict[int, np.ndarray]:
    """layer -> [n_prompts, d_model] float64 `blocks.{l}.hook_resid_post` at each prompt's last token.

    Prompts of equal length are batched together (no padding, so the last position is the last token).
    """
    import torch

    model = loaded.model
    n_layers = model.cfg.n_layers
    out = {l: np.empty((len(token_ids), model.cfg.d_model)) for l in range(n_layers)}
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(token_ids):
        by_len.setdefault(len(ids), []).append(i)
    for rows_all in by_len.values():
        for s in range(0, len(rows_all), batch_size):
            rows = rows_all[s:s + batch_size]
            store: dict[int, Any] = {}

            def keep(act, hook, store=store):
                store[int(hook.name.split(".")[1])] = act[:, -1].detach().to(torch.float64).cpu().numpy()

            tokens = torch.tensor([list(token_ids[i]) for i in rows], device=model.cfg.device)
            with torch.inference_mode():
                # stop after the last block: the unembedding (Gemma: 262k vocab) is not needed
                model.run_with_hooks(tokens, stop_at_layer=n_layers,
                                     fwd_hooks=[(lambda name: name.endswith("hook_resid_post"), keep)])
            for l in range(n_layers):
                out[l][rows] = store[l]
    return out


def representation_cka(model_cfg_a: dict, model_cfg_b: dict, card_a: ModelCard, card_b: ModelCard,
                       dataset_a: Path, dataset_b: Path, texts: Sequence[str]) -> DepthCKA:
    """Linear CKA by depth between the two models' last-token residual streams on `texts`.

    Each text is tokenized with the model's own BOS convention (`mechflow.models.encode`, the
    tokenization the task datasets use); for the texts of the model's own dataset the ids must
    equal the dataset's `clean_ids`, else the dataset was prepared for another model/convention.
    """
    from mechflow.models import encode, load_model_from_cfg
    from mechflow.tasks.dataset import TaskDataset

    acts = []
    for mcfg, card, ds_path in ((model_cfg_a, card_a, dataset_a), (model_cfg_b, card_b, dataset_b)):
        loaded = load_model_from_cfg(mcfg)
        if loaded.card.name != card.name or loaded.card.n_layers != card.n_layers:
            raise ConfigError(f"model config {mcfg.get('name')!r} loads {loaded.card.name} but the model card says "
                              f"{card.name}; pass the model config of the run that produced the scores")
        ids = [encode(loaded.tokenizer, t, loaded.card.prepend_bos, loaded.card.bos_token_id) for t in texts]
        own = {it.prompt: it.clean_ids for it in TaskDataset.load(ds_path).examples}
        for t, row in zip(texts, ids):
            if t in own and own[t] != row:
                raise DataError(f"{ds_path}: clean_ids of {t!r} differ from {card.name}'s tokenization with its BOS "
                                "convention; pass each model's own dataset (or re-run prepare_task)")
        acts.append(last_token_residuals(loaded, ids))
    return cka_by_depth(acts[0], acts[1], n_layers_a=card_a.n_layers, n_layers_b=card_b.n_layers, n_shuffles=20)
