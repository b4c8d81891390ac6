"""The `attribute` stage: node-level attributions of one task on one model, and their figures.

1. Take the first `n_prompts` pairs of the task's largest equal-length bucket.
2. Per head and per MLP, per prompt: exact activation patching (the reference; clean run with the
   component's corrupted activation, "noising"), attribution patching (gradients through every
   later layer) and integrated-gradients patching (`ig_steps` points on the activation path).
3. Their agreement with exact patching (Pearson / Spearman over components), logit lens per layer,
   per-head direct logit attribution, head typing on generated diagnostic sequences (and, for IOI
   when `ioi_roles`, name-mover / S-inhibition candidates from their patching profile).
4. Parquet tables, head × layer heat maps, the logit-lens plot, and a markdown summary.

Works on every model, including Gemma-3 (node-level patching needs no additive per-head sender).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl
import torch
from scipy import stats as sps

from mechflow.attribution.config import AttributionConfig
from mechflow.attribution.gradients import attribution_patching, integrated_gradients_patching
from mechflow.attribution.head_types import SCORE_KINDS, head_type_scores, ioi_head_roles
from mechflow.attribution.lens import direct_logit_attribution, logit_lens
from mechflow.attribution.patching import exact_patching
from mechflow.attribution.plots import plot_head_grid, plot_logit_lens
from mechflow.contracts.attribution import Agreement
from mechflow.contracts.documents import write_document
from mechflow.contracts.parquet import (
    DLA_SCHEMA,
    HEAD_TYPES_SCHEMA,
    LENS_SCHEMA,
    NODE_SCORES_SCHEMA,
    PROMPTS_SCHEMA,
    write_table,
)
from mechflow.io import atomic_write_text
from mechflow.tasks import TaskDataset, select_batch

log = logging.getLogger(__name__)

def long_rows(method: str, heads: torch.Tensor, mlps: torch.Tensor) -> pl.DataFrame:
    """[L, H, n] and [L, n] per-prompt scores -> the node_scores long table."""
    L, H, n = heads.shape
    comp, kind, layer, head, prompt, score = [], [], [], [], [], []
    for lay in range(L):
        for h in range(H):
            comp += [f"a{lay}.h{h}"] * n
            kind += ["head"] * n
            layer += [lay] * n
            head += [h] * n
            prompt += list(range(n))
            score += heads[lay, h].double().tolist()
        comp += [f"m{lay}"] * n
        kind += ["mlp"] * n
        layer += [lay] * n
        head += [-1] * n
        prompt += list(range(n))
        score += mlps[lay].double().tolist()
    return pl.DataFrame({"method": [method] * len(comp), "component": comp, "kind": kind,
                         "layer": pl.Series(layer, dtype=pl.Int32), "head": pl.Series(head, dtype=pl.Int32),
                         "prompt": pl.Series(prompt, dtype=pl.Int32), "score": score})


def _agreement(node_scores: pl.DataFrame) -> dict:
    means = node_scores.group_by("method", "component").agg(pl.col("score").mean()).sort("component")
    exact = means.filter(pl.col("method") == "exact")["score"].to_numpy()
    out = {}
    for method in sorted(set(means["method"]) - {"exact"}):
        other = means.filter(pl.col("method") == method)["score"].to_numpy()
        out[method] = {"pearson_vs_exact": float(sps.pearsonr(exact, other).statistic),
                       "spearman_vs_exact": float(sps.spearmanr(exact, other).statistic),
                       "max_abs_error": float(abs(exact - other).max())}
    return out


def _head_labels(types, threshold: float) -> pl.DataFrame:
    stacked = torch.stack([types.scores[k] for k in SCORE_KINDS])  # [kinds, L, H]
    best, which = stacked.max(0)
    L, H = best.shape
    rows = []
    for lay in range(L):
        for h in range(H):
            label = SCORE_KINDS[int(which[lay, h])] if float(best[lay, h]) >= threshold else "other"
            row = {"component": f"a{lay}.h{h}", "layer": lay, "head": h, "label": "sink" if label == "bos" else label}
            row.update({k: float(types.scores[k][lay, h]) for k in SCORE_KINDS})
            rows.append(row)
    return pl.DataFrame(rows).with_columns(pl.col("layer").cast(pl.Int32), pl.col("head").cast(pl.Int32))


def attribute(cfg: AttributionConfig | Mapping[str, Any], *, model_cfg: dict, dataset: Path,
                    node_scores: Path, prompts: Path,
                    head_types: Path, lens: Path, dla: Path, agreement: Path, heads_figure: Path,
                    lens_figure: Path, summary: Path, task: str = "task") -> dict:
    """Stage function of rule `attribute` (steps 1-4 of the module docstring)."""
    from mechflow.models import load_model_from_cfg

    c = AttributionConfig.from_dict(cfg)  # typed once: the class holds every default and check
    loaded = load_model_from_cfg(model_cfg)
    model = loaded.model
    ds = TaskDataset.load(dataset)
    batch = select_batch(ds, int(c.n_prompts), dataset)
    n = len(batch)

    per_method = {}
    for method in c.methods:
        if method == "exact":
            heads = exact_patching(model, batch, "head", per_prompt=True, max_batch=c.max_batch)
            mlps = exact_patching(model, batch, "mlp", per_prompt=True, max_batch=c.max_batch)
        elif method == "ap":
            heads = attribution_patching(model, batch, "head", per_prompt=True)
            mlps = attribution_patching(model, batch, "mlp", per_prompt=True)
        else:
            heads = integrated_gradients_patching(model, batch, "head", steps=c.ig_steps, per_prompt=True,
                                                  max_batch=c.max_batch)
            mlps = integrated_gradients_patching(model, batch, "mlp", steps=c.ig_steps, per_prompt=True,
                                                 max_batch=c.max_batch)
        per_method[method] = (heads.detach(), mlps.detach())
        log.info("attribution %s done", method)
    table = pl.concat([long_rows(m, *per_method[m]) for m in c.methods])
    write_table(table, node_scores, NODE_SCORES_SCHEMA)

    with torch.no_grad():
        clean_m = batch.metric(model(batch.clean_tokens)).double().tolist()
        corrupted_m = batch.metric(model(batch.corrupted_tokens)).double().tolist()
    by_id = {it.id: it for it in ds.examples}
    write_table(pl.DataFrame({
        "prompt": pl.Series(range(n), dtype=pl.Int32),
        "example_id": [str(i) for i in batch.example_ids],
        "template": [getattr(by_id.get(i), "template", None) for i in batch.example_ids],
        "clean_metric": clean_m, "corrupted_metric": corrupted_m}), prompts, PROMPTS_SCHEMA)

    types = head_type_scores(model, n_seqs=c.head_type_seqs, seq_len=c.head_type_seq_len,
                             bos_id=loaded.card.bos_token_id if loaded.card.prepend_bos else None)
    labels = _head_labels(types, c.head_type_threshold)
    if c.ioi_roles and ds.kind == "ioi":
        roles = ioi_head_roles(model, batch.clean_tokens, batch.corrupted_tokens, batch.metric,
                               batch.answer_ids, batch.wrong_ids, max_batch=c.max_batch)
        role_of = {(r["layer"], r["head"]): r["role"] for r in roles.iter_rows(named=True)}
        labels = labels.with_columns(pl.struct("layer", "head").map_elements(
            lambda r: role_of.get((r["layer"], r["head"])), return_dtype=pl.Utf8).alias("ioi_role"))
        labels = labels.with_columns(pl.when(pl.col("ioi_role").is_in(["name_mover", "s_inhibition"]))
                                     .then(pl.col("ioi_role")).otherwise(pl.col("label")).alias("label"))
    write_table(labels, head_types, HEAD_TYPES_SCHEMA)

    lens_result = logit_lens(model, batch.clean_tokens, batch.answer_ids, batch.wrong_ids)
    write_table(lens_result.to_frame(), lens, LENS_SCHEMA)
    dla_result = direct_logit_attribution(model, batch.clean_tokens, batch.answer_ids, batch.wrong_ids)
    write_table(dla_result.to_frame(), dla, DLA_SCHEMA)

    agree = _agreement(table)
    agree.update({"n_prompts": n, "ig_steps": c.ig_steps, "direction": "noising",
                  "m_clean_mean": sum(clean_m) / n, "m_corrupted_mean": sum(corrupted_m) / n,
                  "dla_sum_minus_logit_diff_max": float((dla_result.total() - lens_result.logit_diff[-1]).abs().max())})
    write_document(agreement, Agreement, agree)

    exact_heads = per_method["exact"][0].mean(-1)
    plot_head_grid(exact_heads, heads_figure, title=f"{model_cfg['name']} × {task}: exact head patching "
                   f"(Δ metric, noising, {n} prompts)", signed=True, colorbar_label="Δ metric")
    plot_logit_lens(lens_result.logit_diff, lens_result.labels, lens_figure,
                    title=f"{model_cfg['name']} × {task}: logit lens (answer − wrong)")
    top = sorted(((float(exact_heads[lay, h]), f"a{lay}.h{h}") for lay in range(exact_heads.shape[0])
                  for h in range(exact_heads.shape[1])), key=lambda t: -abs(t[0]))[:8]
    lines = "\n".join(f"| {name} | {score:+.4f} |" for score, name in top)
    names = {"ap": "attribution patching", "ig": f"IG patching ({c.ig_steps} steps)"}
    agreement_rows = "\n".join(f"| {names[m]} | {agree[m]['pearson_vs_exact']:.3f} "
                               f"| {agree[m]['spearman_vs_exact']:.3f} |"
                                for m in c.methods if m != "exact")
    atomic_write_text(summary, f"""# Attribution: {model_cfg['name']} × {task}

{n} prompt pairs; scores are m(patched) − m(clean) when one component takes its corrupted value
(`node_scores.parquet`, per prompt). Clean metric {agree['m_clean_mean']:.4f}, corrupted
{agree['m_corrupted_mean']:.4f} (`agreement.json`).

| method vs exact patching | Pearson | Spearman |
|---|---|---|
{agreement_rows}

Top heads by |exact effect|:

| head | Δ metric |
|---|---|
{lines}

Head types (`head_types.parquet`), logit lens (`lens.parquet`), direct logit attribution (`dla.parquet`).
""")
    return {"n_prompts": n, **{f"{m}_{k}": v for m, d in agree.items() if isinstance(d, dict) for k, v in d.items()}}
