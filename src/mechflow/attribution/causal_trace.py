"""The ``causal_trace`` stage: causal tracing (Meng et al. 2022, ROME) of tasks with subject positions.

Gaussian noise on the subject token embeddings, clean residual / attention / MLP states restored
per (layer, position) (`mechflow.attribution.causal_tracing`); indirect effect on the answer
probability. Which tasks have subjects: `mechflow.attribution.planning.SUBJECT_KINDS`.
The subject positions are read from the dataset: a factual-recall corrupted prompt is the same
relation template with another subject of the same token length, so the subject span is
first..last position where the clean and corrupted token ids differ (checked to exclude the
final position). ROME's position roles (first / middle / last subject token, first
subsequent, further, last token) align prompts of different templates for the heat map.
Restoring the clean ``resid_pre 0`` at every position must give the clean metric; the rule
checks it and records ``m_restore_all``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor

from mechflow.attribution.causal_tracing import answer_probability, noise_sigma, run_restored
from mechflow.attribution.causal_tracing import causal_trace as trace_effects
from mechflow.attribution.config import CausalTracingConfig
from mechflow.attribution.planning import SUBJECT_KINDS
from mechflow.attribution.stage_io import read_table, resolve_model, save_figure
from mechflow.contracts.parquet import CAUSAL_TRACING_SCHEMA, write_table
from mechflow.errors import ConfigError, DataError
from mechflow.models.config import ModelConfig
from mechflow.tasks import TaskBatch, TaskDataset, select_batch

log = logging.getLogger(__name__)

ROLES = ("prefix", "first subject", "middle subject", "last subject", "first subsequent", "further", "last token")


def subject_positions(batch: TaskBatch, where: Path | str = "dataset") -> list[list[int]]:
    """Subject span per prompt: first..last position where clean and corrupted ids differ (module doc, 6)."""
    diff = batch.clean_tokens != batch.corrupted_tokens
    last = batch.clean_tokens.shape[1] - 1
    spans = []
    for i, row in enumerate(diff):
        idx = row.nonzero().flatten()
        if idx.numel() == 0 or int(idx[-1]) == last:
            raise DataError(f"{where}: example {batch.example_ids[i]!r}: the clean and corrupted prompts "
                            f"{'are identical' if idx.numel() == 0 else 'differ at the final position'}, so "
                            "no subject span can be read from them; causal tracing needs a task whose corrupted "
                            "prompt swaps only the subject (kind: factual_recall)")
        spans.append(list(range(int(idx[0]), int(idx[-1]) + 1)))
    return spans


def position_roles(n_pos: int, span: list[int]) -> list[str]:
    """ROME's token roles (Meng et al. 2022, Fig. 1/2) for one prompt; a 1-token subject is 'last subject'."""
    s0, s1, last = span[0], span[-1], n_pos - 1
    roles = []
    for p in range(n_pos):
        if p == last:
            roles.append("last token")
        elif p < s0:
            roles.append("prefix")
        elif p == s1:
            roles.append("last subject")
        elif p == s0:
            roles.append("first subject")
        elif p < s1:
            roles.append("middle subject")
        elif p == s1 + 1:
            roles.append("first subsequent")
        else:
            roles.append("further")
    return roles


def causal_tracing_table(model, batch: TaskBatch, ct: CausalTracingConfig, where: Path | str = "dataset"
                         ) -> pl.DataFrame:
    """Step 6: per (kind, layer, position, prompt) indirect effect, with the restore-all check."""
    tokens = batch.clean_tokens
    spans = subject_positions(batch, where)
    metric = answer_probability(batch.answer_ids) if ct.metric == "probability" else batch.metric
    restore_all = restore_all_metric(model, tokens, spans, metric, ct)
    n, n_pos = tokens.shape
    roles = [position_roles(n_pos, s) for s in spans]
    frames = []
    for kind in ct.kinds:
        window = 1 if kind == "resid" else ct.window  # ROME: single layers for the residual, windows otherwise
        tr = trace_effects(model, tokens, spans, metric, kind=kind, window=window, noise_scale=ct.noise_scale,
                          n_samples=ct.n_samples, seed=ct.seed, max_batch=ct.max_batch, progress=True)
        if (restore_all - tr.clean).abs().max() > 1e-5 * max(1.0, float(tr.clean.abs().max())):
            raise DataError(f"causal tracing: restoring every clean position at layer 0 gives {restore_all.tolist()}, "
                            f"not the clean metric {tr.clean.tolist()}: the hooks do not reproduce the model")
        e = tr.effects  # [L, pos, n]
        L = e.shape[0]
        frames.append(pl.DataFrame({
            "kind": [kind] * (L * n_pos * n),
            "layer": [l for l in range(L) for _ in range(n_pos * n)],
            "position": [p for _ in range(L) for p in range(n_pos) for _ in range(n)],
            "prompt": [i for _ in range(L * n_pos) for i in range(n)],
            "score": e.reshape(-1).tolist(),
            "window": [window] * (L * n_pos * n),
            "m_corrupted": tr.corrupted.tolist() * (L * n_pos),
            "sigma": [tr.sigma] * (L * n_pos * n)}))
    per_prompt = pl.DataFrame({"prompt": list(range(n)), "example_id": [str(i) for i in batch.example_ids],
                               "m_clean": tr.clean.tolist(), "m_restore_all": restore_all.tolist()})
    cells = pl.DataFrame({"prompt": [i for i in range(n) for _ in range(n_pos)],
                          "position": [p for _ in range(n) for p in range(n_pos)],
                          "token_id": tokens.reshape(-1).tolist(),
                          "role": [r for rs in roles for r in rs],
                          "is_subject": [p in spans[i] for i in range(n) for p in range(n_pos)]})
    out = pl.concat(frames).join(cells, on=["prompt", "position"]).join(per_prompt, on="prompt")
    out = out.with_columns(pl.lit("answer_probability" if ct.metric == "probability" else batch.metric_kind)
                           .alias("metric"), pl.lit(ct.n_samples).alias("n_samples"),
                           *(pl.col(k).cast(pl.Int32) for k in ("layer", "position", "prompt", "window")))
    return out.select("kind", "layer", "position", "role", "is_subject", "prompt", "example_id", "token_id", "score",
                      "m_clean", "m_corrupted", "m_restore_all", "metric", "window", "sigma", "n_samples")


@torch.no_grad()
def restore_all_metric(model, tokens: Tensor, spans: list[list[int]], metric, ct: CausalTracingConfig) -> Tensor:
    """Metric of the noised run (first noise draw of `trace_effects`) with every clean ``resid_pre 0`` restored."""
    n, n_pos = tokens.shape
    _, cache = model.run_with_cache(tokens, names_filter=lambda x: x == "blocks.0.hook_resid_pre")
    gen = torch.Generator().manual_seed(ct.seed)
    noise = torch.randn(n, n_pos, model.cfg.d_model, generator=gen, dtype=torch.float64) \
        * noise_sigma(model, ct.noise_scale)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    for i, s in enumerate(spans):
        mask[i, s] = True
    return run_restored(model, tokens, noise, mask, [{0: list(range(n_pos))}],
                        {0: cache["blocks.0.hook_resid_pre"]}, "resid", metric)[0].double()


def plot_causal_tracing(frame: pl.DataFrame, path: Path, title: str) -> None:
    """ROME-style heat maps: mean indirect effect per (token role, layer), one panel per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = role_means(frame)
    kinds = list(dict.fromkeys(frame["kind"].to_list()))
    roles = [r for r in ROLES if r in set(means["role"].to_list())]
    n_layers = int(frame["layer"].max()) + 1
    fig, axes = plt.subplots(1, len(kinds), figsize=(max(4.0, 0.18 * n_layers + 3.0) * len(kinds),
                                                     0.35 * len(roles) + 1.8), squeeze=False, layout="constrained")
    names = {"resid": "residual (single layer)", "mlp": "MLP", "attn": "attention"}
    for ax, kind in zip(axes[0], kinds):
        grid = np.full((len(roles), n_layers), np.nan)
        for r in means.filter(pl.col("kind") == kind).iter_rows(named=True):
            grid[roles.index(r["role"]), r["layer"]] = r["score"]
        vmax = float(np.nanmax(np.abs(grid))) or 1.0
        if np.nanmin(grid) < 0:  # negative effects: a diverging map centred at 0
            im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        else:  # ROME's colours, from 0
            cmap = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}[kind]
            im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0.0, vmax=vmax)
        ax.set_xticks(range(0, n_layers, max(1, n_layers // 10)))
        ax.set_yticks(range(len(roles)))
        ax.set_yticklabels(roles, fontsize=7)
        ax.set_xlabel("layer")
        window = frame.filter(pl.col("kind") == kind)["window"][0]
        ax.set_title(f"restore {names[kind]}" + (f", window {window}" if kind != "resid" else ""), fontsize=9)
        fig.colorbar(im, ax=ax, label="indirect effect")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def role_means(frame: pl.DataFrame) -> pl.DataFrame:
    """Mean IE per (kind, layer, role): over the role's positions within a prompt, then over prompts."""
    return (frame.group_by("kind", "layer", "role", "prompt").agg(pl.col("score").mean())
            .group_by("kind", "layer", "role").agg(pl.col("score").mean()).sort("kind", "layer", "role"))


def causal_trace(cfg: CausalTracingConfig | Mapping[str, Any], *, model_cfg: ModelConfig | Mapping[str, Any],
                 dataset: Path, causal_tracing: Path, figure: Path, task: str = "task",
                 loaded_model: Any = None) -> dict:
    """Stage function of rule `causal_trace` (the module docstring).

    Args:
        cfg: the ``causal_tracing`` group.
    """
    ct = CausalTracingConfig.from_dict(cfg)
    model, _, name = resolve_model(model_cfg, loaded_model)
    ds = TaskDataset.load(dataset)
    if ds.kind not in SUBJECT_KINDS:
        raise ConfigError(f"{dataset}: task kind {ds.kind!r} has no subject positions; causal tracing runs for "
                          f"kinds {sorted(SUBJECT_KINDS)} only")
    batch = select_batch(ds, ct.n_prompts, dataset)
    frame = causal_tracing_table(model, batch, ct, dataset)
    write_table(frame, causal_tracing, CAUSAL_TRACING_SCHEMA)
    plot_causal_tracing(read_table(causal_tracing, CAUSAL_TRACING_SCHEMA, "causal_trace"), figure,
                        f"{name} × {task}: causal tracing ({len(batch)} prompts, {ct.n_samples} noise samples)")
    means = role_means(frame).sort("score", descending=True)
    return {"n_prompts": len(batch), "peak_indirect_effect": float(means["score"][0])}
