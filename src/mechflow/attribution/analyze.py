"""The ``analyze`` stage: per-task analyses beyond node attribution (ablations, token saliency, neurons).

Rule ``causal_trace`` (`mechflow.attribution.causal_trace`) adds causal tracing for tasks with
subjects; ``analysis.md`` summarises its table too when the task has one.

1. Prompts: the first ``n_prompts`` pairs of the task's largest equal-length bucket (as the
   `attribute` stage). That whole bucket is the "task distribution" the mean ablation averages
   over; its prompts outside the batch are the resample-ablation source (a seeded derangement of
   the batch when the bucket has no others).
2. Token saliency (`mechflow.attribution.saliency`): gradient norm, gradient x input and
   integrated gradients (Sundararajan et al. 2017) from the corrupted prompt's embeddings
   (default). Completeness residual ``sum_pos IG - (m(clean) - m(baseline))`` per prompt, checked
   against ``ig_atol + ig_rtol |m(clean) - m(baseline)|``: ``ig_check: error`` fails the rule
   naming the prompt, ``flag`` records ``ig_complete = false`` and says so in analysis.md.
3. Neurons (`mechflow.attribution.neuron_contexts`): the top MLP neurons by direct logit
   attribution and by attribution patching, each with its top-activating contexts (from the
   harvest where it holds ``mlp.hook_post``, else from the run's corpus).
4. Ablations (`mechflow.attribution.ablation`): zero, mean and resample ablation of every head
   (``hook_z``) and MLP (``hook_mlp_out``), per prompt ``m(ablated) - m(clean)`` (Wang et al.
   2022; Chan et al. 2022), plus a layer x head (+ MLP column) figure per method.
5. ``analysis.md`` (`mechflow.attribution.analysis_report`), every number read back from the files
   written.
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

from mechflow.attribution.ablation import ablate_components
from mechflow.attribution.analysis_report import analysis_markdown
from mechflow.attribution.config import AnalysisConfig
from mechflow.attribution.neuron_contexts import neurons_markdown, neurons_table
from mechflow.attribution.saliency import gradient_saliency, integrated_gradients
from mechflow.attribution.stage import long_rows
from mechflow.attribution.stage_io import optional_path, read_table, resolve_model, save_figure
from mechflow.contracts.parquet import ABLATIONS_SCHEMA, NEURONS_SCHEMA, SALIENCY_SCHEMA, write_table
from mechflow.errors import DataError
from mechflow.io import atomic_write_text
from mechflow.models.config import ModelConfig
from mechflow.tasks import TaskBatch, TaskDataset, make_batch, select_batch

log = logging.getLogger(__name__)


def _bucket(ds: TaskDataset, batch: TaskBatch) -> TaskBatch:
    """All examples of the batch's token length: the task distribution the batch is drawn from."""
    width = batch.clean_tokens.shape[1]
    return make_batch([it for it in ds.examples if it.n_tokens == width], ds.metric_kind)


def saliency_table(model, batch: TaskBatch, c: AnalysisConfig, tokenizer=None) -> pl.DataFrame:
    """Step 2: one row per (method, prompt, position), with the per-prompt IG completeness check."""
    grad, gxi = gradient_saliency(model, batch.clean_tokens, batch.metric)
    ig = integrated_gradients(model, batch.clean_tokens, batch.metric, baseline=c.ig_baseline,
                              corrupted_tokens=batch.corrupted_tokens, steps=c.ig_steps, max_batch=c.max_batch)
    residual = ig.completeness_error.detach().double()
    delta = (ig.metric - ig.baseline_metric).detach().double()
    tol = c.ig_atol + c.ig_rtol * delta.abs()
    n = len(batch)
    per_prompt = pl.DataFrame({
        "prompt": list(range(n)), "example_id": [str(i) for i in batch.example_ids],
        "metric": ig.metric.detach().double().tolist(),
        "baseline_metric": ig.baseline_metric.detach().double().tolist(),
        "ig_completeness_residual": residual.tolist(), "ig_tolerance": tol.tolist(),
        "ig_complete": (residual.abs() <= tol).tolist()})
    frame = pl.concat([r.to_frame(batch.clean_tokens) for r in (grad, gxi, ig)])
    if tokenizer is not None:
        frame = frame.with_columns(pl.col("token_id").map_elements(lambda i: tokenizer.decode([i]),
                                                                   return_dtype=pl.Utf8).alias("token"))
    else:
        frame = frame.with_columns(pl.lit(None, pl.Utf8).alias("token"))
    frame = frame.join(per_prompt, on="prompt", how="left").with_columns(
        pl.col("prompt").cast(pl.Int32), pl.col("position").cast(pl.Int32), pl.col("token_id").cast(pl.Int64),
        pl.lit(c.ig_baseline).alias("ig_baseline"), pl.lit(c.ig_steps).cast(pl.Int32).alias("ig_steps"))
    return frame.select("method", "prompt", "example_id", "position", "token_id", "token", "score", "metric",
                        "baseline_metric", "ig_baseline", "ig_steps", "ig_completeness_residual", "ig_tolerance",
                        "ig_complete")


def check_completeness(frame: pl.DataFrame, c: AnalysisConfig, where: Path) -> int:
    """Number of prompts failing the IG completeness check; DataError when ``ig_check: error``."""
    bad = (frame.filter(pl.col("method") == "integrated_gradients").unique("prompt").sort("prompt")
           .filter(~pl.col("ig_complete")))
    if bad.height and c.ig_check == "error":
        row = bad.row(0, named=True)
        raise DataError(
            f"{where}: integrated gradients is incomplete for {bad.height} prompt(s); prompt {row['prompt']}: "
            f"sum IG - (m - m_baseline) = {row['ig_completeness_residual']:+.3g} exceeds the tolerance "
            f"{row['ig_tolerance']:.3g}. Raise analysis.ig_steps (now {c.ig_steps}), loosen "
            "ig_rtol/ig_atol, or set ig_check: flag to record it and go on")
    if bad.height:
        log.warning("integrated gradients incomplete for %d prompt(s) (ig_check: flag)", bad.height)
    return bad.height


def plot_saliency(frame: pl.DataFrame, path: Path, title: str, max_prompts: int = 8) -> None:
    """IG per token for the first prompts (tokens as text when a tokenizer was available)."""
    from mechflow.attribution.plots import plot_token_saliency

    ig = frame.filter((pl.col("method") == "integrated_gradients") & (pl.col("prompt") < max_prompts))
    ig = ig.sort("prompt", "position")
    n = ig["prompt"].n_unique()
    scores = torch.tensor(ig["score"].to_numpy()).reshape(n, -1)
    labels = [t if t is not None else str(i) for t, i in zip(ig["token"].to_list(), ig["token_id"].to_list())]
    width = scores.shape[1]
    plot_token_saliency(scores, [labels[i * width:(i + 1) * width] for i in range(n)], path, title=title)


def resample_reference(bucket: TaskBatch, batch: TaskBatch) -> Tensor | None:
    """The bucket's prompts outside the batch (None -> a derangement of the batch itself)."""
    ids = set(batch.example_ids)
    keep = [i for i, e in enumerate(bucket.example_ids) if e not in ids]
    return bucket.clean_tokens[keep] if keep else None


def ablations_table(model, batch: TaskBatch, bucket: TaskBatch, c: AnalysisConfig) -> pl.DataFrame:
    """Step 4: per-prompt ``m(ablated) - m(clean)`` of every head and MLP, per method."""
    frames = []
    for method in c.ablations:
        ref = {"zero": None, "mean": bucket.clean_tokens, "resample": resample_reference(bucket, batch)}[method]
        kw = {"reference_tokens": ref, "seed": c.seed, "max_batch": c.max_batch, "per_prompt": True, "progress": True}
        heads = ablate_components(model, batch.clean_tokens, batch.metric, "head", method, **kw)
        mlps = ablate_components(model, batch.clean_tokens, batch.metric, "mlp", method, **kw)
        frames.append(long_rows(method, heads.detach(), mlps.detach()))
        log.info("%s ablation done", method)
    with torch.no_grad():
        clean = batch.metric(model(batch.clean_tokens)).double().tolist()
    prompts = pl.DataFrame({"prompt": pl.Series(range(len(batch)), dtype=pl.Int32),
                            "example_id": [str(i) for i in batch.example_ids], "clean_metric": clean})
    if not frames:
        return pl.DataFrame(schema={"method": pl.Utf8, "component": pl.Utf8, "kind": pl.Utf8, "layer": pl.Int32,
                                    "head": pl.Int32, "prompt": pl.Int32, "score": pl.Float64,
                                    "example_id": pl.Utf8, "clean_metric": pl.Float64,
                                    "reference": pl.Utf8})
    held_out = resample_reference(bucket, batch)
    reference = {"zero": "none (activation set to 0)",
                 "mean": f"mean over the {len(bucket)} bucket prompts at each position",
                 "resample": "a seeded derangement of the batch" if held_out is None else
                 f"a seeded draw from the {held_out.shape[0]} held-out bucket prompts"}
    return pl.concat(frames).join(prompts, on="prompt", how="left").with_columns(
        pl.col("method").replace_strict(reference, return_dtype=pl.Utf8).alias("reference"))


def plot_ablations(frame: pl.DataFrame, n_layers: int, n_heads: int, path: Path, title: str) -> None:
    """One panel per method: mean effect per layer x head, the MLP as an extra column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(frame["method"].to_list())) or ["none"]
    fig, axes = plt.subplots(1, len(methods), figsize=(max(3.5, 0.4 * (n_heads + 1) + 1.8) * len(methods),
                                                       max(3.0, 0.22 * n_layers + 1.2)), squeeze=False,
                             layout="constrained")
    means = frame.group_by("method", "kind", "layer", "head").agg(pl.col("score").mean())
    for ax, method in zip(axes[0], methods):
        grid = np.zeros((n_layers, n_heads + 1))
        for r in means.filter(pl.col("method") == method).iter_rows(named=True):
            grid[r["layer"], r["head"] if r["kind"] == "head" else n_heads] = r["score"]
        vmax = float(np.abs(grid).max()) or 1.0
        im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.axvline(n_heads - 0.5, color="black", lw=1.0)
        ax.set_xticks(range(n_heads + 1))
        ax.set_xticklabels([str(h) for h in range(n_heads)] + ["MLP"], fontsize=7)
        ax.set_yticks(range(0, n_layers, max(1, n_layers // 15)))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{method} ablation")
        fig.colorbar(im, ax=ax, label="Δ metric (ablated − clean)")
    fig.suptitle(title)
    save_figure(fig, path)


def analyze(cfg: AnalysisConfig | Mapping[str, Any], *, model_cfg: ModelConfig | Mapping[str, Any], dataset: Path,
            tokens: Path, ablations: Path, ablations_figure: Path, saliency: Path, saliency_figure: Path,
            neurons: Path, neurons_md: Path, summary: Path, harvest_index: Path | list | None = None,
            causal_tracing: Path | list | None = None, task: str = "task", loaded_model: Any = None) -> dict:
    """Stage function of rule `analyze` (steps 1-5 of the module docstring).

    Args:
        cfg: the ``analysis`` group.
        tokens: the run's corpus ``tokens.parquet`` (neuron contexts when the harvest lacks them).
        harvest_index: the run's harvest ``index.json`` when it holds ``mlp.hook_post`` hooks.
        causal_tracing: ``causal_tracing.parquet`` of the task, when it has one (summarised too).
        loaded_model: an already loaded LoadedModel or HookedTransformer (default: load ``model_cfg``).
    """
    c = AnalysisConfig.from_dict(cfg)
    harvest_index = optional_path(harvest_index)
    causal_tracing = optional_path(causal_tracing)
    model, tokenizer, name = resolve_model(model_cfg, loaded_model)
    ds = TaskDataset.load(dataset)
    batch = select_batch(ds, c.n_prompts, dataset)
    bucket = _bucket(ds, batch)
    title = f"{name} × {task}"

    sal = saliency_table(model, batch, c, tokenizer)
    n_incomplete = check_completeness(sal, c, dataset)
    write_table(sal, saliency, SALIENCY_SCHEMA)
    plot_saliency(sal, saliency_figure, f"{title}: integrated gradients per token ({c.ig_baseline} baseline)")

    neur = neurons_table(model, batch, c, tokens=tokens, harvest_index=harvest_index, tokenizer=tokenizer)
    write_table(neur, neurons, NEURONS_SCHEMA)
    atomic_write_text(neurons_md, neurons_markdown(read_table(neurons, NEURONS_SCHEMA, "analyze"), title))

    abl = ablations_table(model, batch, bucket, c)
    write_table(abl, ablations, ABLATIONS_SCHEMA)
    plot_ablations(read_table(ablations, ABLATIONS_SCHEMA, "analyze"), model.cfg.n_layers, model.cfg.n_heads,
                   ablations_figure, f"{title}: ablations ({len(batch)} prompts)")

    atomic_write_text(summary, analysis_markdown(title, ablations=ablations, saliency=saliency, neurons=neurons,
                                                 causal_tracing=causal_tracing))
    return {"n_prompts": len(batch), "ig_incomplete_prompts": n_incomplete,
            "ig_max_abs_residual": float(sal["ig_completeness_residual"].abs().max())}
