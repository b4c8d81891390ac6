"""Ranking stability of the component scores (step 5 of `mechflow.stats.stage`).

Kendall tau-b and top-k Jaccard (`mechflow.stats.stability`) between the attribution methods'
mean scores, between each method's full-sample ranking and its ranking on every bootstrap
resample (the stage's shared resample indices), and between prompt templates; each ranking both
by signed mean score and by |mean score| (`RANKINGS`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import polars as pl

from mechflow.stats.config import StatsConfig
from mechflow.stats.output import nan_to_none
from mechflow.stats.readers import NodeScores, Prompts
from mechflow.stats.stability import (
    PairwiseStability,
    bootstrap_rank_stability,
    pairwise_stability,
    top_k_set,
)


def _pairwise_dict(res: PairwiseStability) -> dict[str, Any]:
    return {"names": res.names, "k": res.k, "tau_b": nan_to_none(res.tau.tolist()),
            "jaccard_top_k": nan_to_none(res.jaccard.tolist()),
            "tau_summary": nan_to_none(res.tau_summary), "jaccard_summary": nan_to_none(res.jaccard_summary)}


RANKINGS = {"signed": False, "abs": True}  # name -> by_abs


def stability_summary(scores: NodeScores, prompts: Prompts, cfg: StatsConfig, indices: np.ndarray) -> dict[str, Any]:
    """Step 5: tau-b and top-k Jaccard between methods, over resamples and across templates."""
    k, qs = cfg.top_k, cfg.quantiles
    out: dict[str, Any] = {"k": k, "n_prompts": len(prompts), "n_components": len(scores.components),
                           "methods": scores.methods, "B": int(indices.shape[0]), "seed": cfg.seed,
                           "rankings": {"signed": "by mean score", "abs": "by |mean score|"}}
    means = {m: scores.mean(m) for m in scores.methods}
    if len(scores.methods) >= 2:
        out["methods_pairwise"] = {r: _pairwise_dict(pairwise_stability(means, k=k, by_abs=b, quantiles=qs))
                                   for r, b in RANKINGS.items()}
    else:
        out["methods_pairwise"] = {"skipped": f"only one method ({scores.methods[0]}) in node_scores.parquet"}
    boot: dict[str, Any] = {}
    for m in scores.methods:
        boot[m] = {}
        for r, b in RANKINGS.items():
            st = bootstrap_rank_stability(scores.scores[m], k=k, by_abs=b, indices=indices, quantiles=qs)
            top = top_k_set(means[m], k, by_abs=b)
            boot[m][r] = {"tau_summary": nan_to_none(st.tau_summary),
                          "jaccard_summary": nan_to_none(st.jaccard_summary),
                          "top_k_frequency": {scores.components[i]: float(st.selection_frequency[i]) for i in top}}
    out["bootstrap"] = boot
    out["templates"] = template_stability(scores, prompts, k, qs)
    return out


def template_stability(scores: NodeScores, prompts: Prompts, k: int, quantiles: Sequence[float]) -> dict[str, Any]:
    """Rank by mean score within each template (>= 2 prompts), compare all template pairs per method."""
    groups: dict[str, list[int]] = {}
    for row, t in enumerate(prompts.template):
        if t is not None:
            groups.setdefault(t, []).append(row)
    counts = {t: len(r) for t, r in sorted(groups.items())}
    used = {t: r for t, r in sorted(groups.items()) if len(r) >= 2}
    out: dict[str, Any] = {"n_prompts_per_template": counts, "templates": list(used)}
    if len(used) < 2:
        out["skipped"] = (f"{len(used)} template(s) with >= 2 prompts (prompts per template: {counts or 'none'}); "
                          "cross-template stability needs at least 2")
        return out
    out["by_method"] = {
        m: {r: _pairwise_dict(pairwise_stability({t: scores.scores[m][rows].mean(axis=0) for t, rows in used.items()},
                                                 k=k, by_abs=b, quantiles=quantiles))
            for r, b in RANKINGS.items()}
        for m in scores.methods}
    return out


def stability_methods_table(stab: dict[str, Any]) -> pl.DataFrame:
    """Long table (ranking, a, b, tau_b, jaccard_top_k, k) over method pairs a < b."""
    rows = []
    mp = stab["methods_pairwise"]
    for r in RANKINGS:
        if r not in mp:
            continue
        names = mp[r]["names"]
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                rows.append({"ranking": r, "a": names[i], "b": names[j], "tau_b": mp[r]["tau_b"][i][j],
                             "jaccard_top_k": mp[r]["jaccard_top_k"][i][j], "k": mp[r]["k"]})
    schema = {"ranking": pl.String, "a": pl.String, "b": pl.String, "tau_b": pl.Float64,
              "jaccard_top_k": pl.Float64, "k": pl.Int64}
    return pl.DataFrame(rows, schema=schema)
