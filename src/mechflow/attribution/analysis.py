"""Per-task analyses beyond node attribution: ablations, token saliency, neurons, causal tracing.

Rule `analyze` runs `run_analysis` (steps 1-5); rule `causal_trace` runs `run_causal_tracing`
(step 6), planned only for tasks with subject positions.

1. Prompts: the first ``n_prompts`` pairs of the task's largest equal-length bucket (as the
   `attribute` stage). That whole bucket is the "task distribution" the mean ablation averages
   over; its prompts outside the batch are the resample-ablation source (a seeded derangement of
   the batch when the bucket has no others).
2. Token saliency (`mechflow.attribution.saliency`): gradient norm, gradient x input and
   integrated gradients (Sundararajan et al. 2017) from the corrupted prompt's embeddings
   (default). Completeness residual ``sum_pos IG - (m(clean) - m(baseline))`` per prompt, checked
   against ``ig_atol + ig_rtol |m(clean) - m(baseline)|``: ``ig_check: error`` fails the rule
   naming the prompt, ``flag`` records ``ig_complete = false`` and says so in analysis.md.
3. Neurons (`mechflow.attribution.neurons`): the ``top_neurons`` MLP neurons by |direct logit
   attribution| (Geva et al. 2022) and by |attribution patching| (noising; Nanda 2023), each with
   its ``contexts_per_neuron`` top-activating contexts. Source of the contexts (decision): the
   harvest when the run harvests that layer's ``blocks.L.mlp.hook_post`` (its whole corpus,
   streamed); otherwise, as with the default harvest (residual and MLP in/out only), a forward
   pass over the first ``context_tokens`` tokens of the run's corpus (``corpus/tokens.parquet``)
   stopped after the last layer needed. Both give the same rows on the same contexts (tested);
   the ``context_source`` column says which was used. The BOS position counts like any other
   (as in the harvest reader), so attention-sink neurons show it.
4. Ablations (`mechflow.attribution.ablation`): zero, mean and resample ablation of every head
   (``hook_z``) and MLP (``hook_mlp_out``), per prompt ``m(ablated) - m(clean)`` (Wang et al.
   2022; Chan et al. 2022), plus a layer x head (+ MLP column) figure per method.
5. ``analysis.md``, every number read back from the files written.
6. Causal tracing (Meng et al. 2022, ROME): Gaussian noise on the subject token embeddings,
   clean residual / attention / MLP states restored per (layer, position); indirect effect on
   the answer probability. Which tasks have subjects (decision): task kinds in
   `SUBJECT_KINDS` (``factual_recall``), known from the task config at planning time. The
   subject positions are read from the dataset: a factual-recall corrupted prompt is the same
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
from tqdm.auto import tqdm

from mechflow.attribution.ablation import ablate_components
from mechflow.attribution.causal_tracing import (
    answer_probability,
    causal_trace,
    noise_sigma,
    run_restored,
)
from mechflow.attribution.config import AnalysisConfig, CausalTracingConfig
from mechflow.attribution.neurons import (
    neuron_attribution_patching,
    neuron_dla,
    top_activating_contexts,
    top_neurons,
)
from mechflow.attribution.saliency import gradient_saliency, integrated_gradients
from mechflow.attribution.stage import long_rows
from mechflow.contracts.documents import read_document
from mechflow.contracts.harvest import HarvestIndex
from mechflow.contracts.hooks import NEURON_HOOK
from mechflow.errors import ConfigError, DataError
from mechflow.harvest.hooks import harvested_hooks
from mechflow.io import atomic_path, atomic_write_text
from mechflow.tasks import TaskBatch, TaskDataset, make_batch, select_batch

log = logging.getLogger(__name__)

SUBJECT_KINDS = frozenset({"factual_recall"})
ROLES = ("prefix", "first subject", "middle subject", "last subject", "first subsequent", "further", "last token")
ANALYZE_OUTPUTS = ("ablations.parquet", "ablations.png", "saliency.parquet", "saliency.png", "neurons.parquet",
                   "neurons.md", "analysis.md")
CAUSAL_TRACE_OUTPUTS = ("causal_tracing.parquet", "causal_tracing.png")


# ---------------------------------------------------------------------------------------- config


# ------------------------------------------------------------------------------ planning helpers


def has_subjects(task_cfg: dict) -> bool:
    """True for tasks whose prompts have subject positions (causal tracing applies)."""
    return task_cfg.get("kind") in SUBJECT_KINDS


def harvests_neurons(harvest_cfg: dict) -> bool:
    """True when the harvest holds some layer's ``mlp.hook_post`` (then `analyze` reads it)."""
    return any(h.endswith(".mlp.hook_post") for h in harvested_hooks(harvest_cfg))


# ------------------------------------------------------------------------------------ shared IO


def _write_parquet(frame: pl.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp, compression="zstd")


def _resolve_model(model_cfg: dict, loaded_model: Any) -> tuple[Any, Any, str]:
    """(HookedTransformer, tokenizer or None, display name) from a LoadedModel, a bare model or the config."""
    from mechflow.models import LoadedModel, load_model_from_cfg

    if loaded_model is None:
        loaded_model = load_model_from_cfg(model_cfg)
    if isinstance(loaded_model, LoadedModel):
        return loaded_model.model, loaded_model.tokenizer, model_cfg.get("name", loaded_model.card.name)
    return loaded_model, getattr(loaded_model, "tokenizer", None), model_cfg.get("name", "model")


def _bucket(ds: TaskDataset, batch: TaskBatch) -> TaskBatch:
    """All examples of the batch's token length: the task distribution the batch is drawn from."""
    width = batch.clean_tokens.shape[1]
    return make_batch([it for it in ds.examples if it.n_tokens == width], ds.metric_kind)


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------------- saliency


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


# -------------------------------------------------------------------------------------- neurons


def corpus_top_contexts(model, contexts: np.ndarray, wanted: dict[int, list[int]], k: int, window: int,
                        batch_size: int = 8, tokenizer=None, progress: bool = False) -> pl.DataFrame:
    """Top-``k`` activations of neurons ``wanted`` (layer -> indices) of ``blocks.L.mlp.hook_post``
    over ``contexts [n, pos]``, computed by running the model (stopped after the last layer needed).

    Rows as `mechflow.attribution.neurons.top_activating_contexts` (neuron, rank, activation,
    context_id, position, token_id, context_token_ids[, context]) plus ``layer``.
    """
    layers = sorted(wanted)
    names = {NEURON_HOOK.format(layer=l): l for l in layers}
    idx = {l: torch.tensor(wanted[l]) for l in layers}
    best = {l: (torch.full((len(wanted[l]), 0), float("-inf")), torch.zeros(len(wanted[l]), 0, dtype=torch.long))
            for l in layers}
    n_ctx, width = contexts.shape
    for start in tqdm(range(0, n_ctx, batch_size), disable=not progress, desc="neuron contexts"):
        toks = torch.from_numpy(contexts[start:start + batch_size]).long()
        with torch.no_grad():
            _, cache = model.run_with_cache(toks, names_filter=lambda x: x in names, stop_at_layer=layers[-1] + 1)
        for name, l in names.items():
            acts = cache[name][..., idx[l]].reshape(-1, len(wanted[l])).T.float()  # [neurons, rows]
            flat = (start * width + torch.arange(acts.shape[1])).expand(len(wanted[l]), -1)
            v, where = torch.cat([best[l][0], acts], 1), torch.cat([best[l][1], flat], 1)
            keep = v.topk(min(k, v.shape[1]), dim=1).indices
            best[l] = (v.gather(1, keep), where.gather(1, keep))
    rows = []
    for l in layers:
        vals, where = best[l]
        for a, neuron in enumerate(wanted[l]):
            for r in range(vals.shape[1]):
                c, p = divmod(int(where[a, r]), width)
                ids = [int(t) for t in contexts[c, max(0, p - window):p + 1]]
                row = {"layer": l, "neuron": neuron, "rank": r, "activation": float(vals[a, r]), "context_id": c,
                       "position": p, "token_id": int(contexts[c, p]), "context_token_ids": ids}
                if tokenizer is not None:
                    row["context"] = tokenizer.decode(ids)
                rows.append(row)
    return pl.DataFrame(rows)


def _harvest_hooks(harvest_index: Path | None) -> set[str]:
    if harvest_index is None:
        return set()
    index = read_document(harvest_index, HarvestIndex, fix="rerun the harvest stage")
    return {h.hook for h in index.hooks}


def neuron_contexts(model, wanted: dict[int, list[int]], c: AnalysisConfig, *, tokens: Path,
                    harvest_index: Path | None, tokenizer=None) -> pl.DataFrame:
    """Top contexts per wanted neuron: from the harvest where it holds the layer's hook_post, else the corpus."""
    from mechflow.corpus.core import read_contexts

    harvested = _harvest_hooks(harvest_index)
    frames, from_corpus = [], {}
    for layer, neurons in sorted(wanted.items()):
        hook = NEURON_HOOK.format(layer=layer)
        if hook in harvested:
            df = top_activating_contexts(harvest_index, neurons, k=c.contexts_per_neuron, window=c.context_window,
                                         hook=hook, tokenizer=tokenizer)
            frames.append(df.with_columns(pl.lit(layer).alias("layer"),
                                          pl.lit(f"harvest:{hook}").alias("context_source")))
        else:
            from_corpus[layer] = neurons
    if from_corpus:
        contexts = read_contexts(tokens)
        n_ctx = max(1, c.context_tokens // contexts.shape[1])
        contexts = contexts[:n_ctx]
        if contexts.max() >= model.cfg.d_vocab:
            raise DataError(f"{tokens}: token id {int(contexts.max())} is outside the model's vocabulary "
                            f"({model.cfg.d_vocab}); rerun the corpus stage with this run's model")
        log.info("neuron contexts of %d layers from %d corpus contexts (%d tokens)", len(from_corpus),
                 len(contexts), contexts.size)
        df = corpus_top_contexts(model, contexts, from_corpus, c.contexts_per_neuron, c.context_window,
                                 c.context_batch, tokenizer, progress=True)
        frames.append(df.with_columns(pl.lit(f"corpus:{contexts.size} tokens").alias("context_source")))
    cols = ["layer", "neuron", "rank", "activation", "context_id", "position", "token_id", "context_token_ids",
            "context", "context_source"]
    out = []
    for f in frames:
        if "context" not in f.columns:
            f = f.with_columns(pl.lit(None, pl.Utf8).alias("context"))
        out.append(f.with_columns(pl.col("layer").cast(pl.Int64), pl.col("neuron").cast(pl.Int64),
                                  pl.col("rank").cast(pl.Int64), pl.col("context_id").cast(pl.Int64),
                                  pl.col("position").cast(pl.Int64), pl.col("token_id").cast(pl.Int64),
                                  pl.col("context_token_ids").cast(pl.List(pl.Int64))).select(cols))
    return pl.concat(out)


def neurons_table(model, batch: TaskBatch, c: AnalysisConfig, *, tokens: Path, harvest_index: Path | None,
                  tokenizer=None) -> pl.DataFrame:
    """Step 3: top neurons by DLA and by attribution patching, one row per (method, neuron, context)."""
    dla = neuron_dla(model, batch.clean_tokens, batch.answer_ids, batch.wrong_ids).neurons.mean(-1)
    ap = neuron_attribution_patching(model, batch.clean_tokens, batch.corrupted_tokens, batch.metric,
                                     direction="noising")
    tops = []
    for method, scores in (("neuron_dla", dla), ("neuron_ap", ap)):
        top = top_neurons(scores.detach(), c.top_neurons, method)
        tops.append(top.with_columns(pl.int_range(pl.len()).alias("rank")))
    top = pl.concat(tops, how="diagonal_relaxed").with_columns(
        pl.struct("layer", "neuron").map_elements(lambda r: float(dla[r["layer"], r["neuron"]]),
                                                  return_dtype=pl.Float64).alias("dla_score"),
        pl.struct("layer", "neuron").map_elements(lambda r: float(ap[r["layer"], r["neuron"]]),
                                                  return_dtype=pl.Float64).alias("ap_score"))
    wanted: dict[int, list[int]] = {}
    for layer, neuron in sorted(set(zip(top["layer"].to_list(), top["neuron"].to_list()))):
        wanted.setdefault(layer, []).append(neuron)
    ctx = neuron_contexts(model, wanted, c, tokens=tokens, harvest_index=harvest_index, tokenizer=tokenizer)
    ctx = ctx.rename({"rank": "context_rank"})
    top = top.select("method", "rank", "component", "layer", "neuron", "score", "dla_score", "ap_score")
    return top.join(ctx, on=["layer", "neuron"], how="left").sort("method", "rank", "context_rank")


def neurons_markdown(frame: pl.DataFrame, title: str) -> str:
    """neurons.md: per method, each top neuron with its scores and top contexts (from neurons.parquet)."""
    names = {"neuron_dla": "direct logit attribution (answer − wrong logit, mean over prompts)",
             "neuron_ap": "attribution patching (noising, Δ task metric, mean over prompts)"}
    out = [f"# Neurons: {title}", "",
           "MLP neurons (`blocks.L.mlp.hook_post`) ranked by |score|; `neurons.parquet` has every row. Contexts:",
           ", ".join(f"`{x}`" for x in frame["context_source"].unique().sort()), ""]
    for method in ("neuron_dla", "neuron_ap"):
        sub = frame.filter(pl.col("method") == method)
        out += [f"## Top by {names[method]}", "", "| rank | neuron | score | DLA | AP | top contexts (activation) |",
                "|---|---|---|---|---|---|"]
        for (rank,), g in sub.group_by("rank", maintain_order=True):
            r = g.row(0, named=True)
            ctx = "<br>".join(
                f"{_md_escape(x['context'] if x['context'] is not None else str(x['context_token_ids']))} "
                f"({x['activation']:.3g})" for x in g.iter_rows(named=True))
            out.append(f"| {rank} | L{r['layer']}N{r['neuron']} | {r['score']:+.4g} | {r['dla_score']:+.4g} | "
                       f"{r['ap_score']:+.4g} | {ctx} |")
        out.append("")
    return "\n".join(out)


def _md_escape(text: str) -> str:
    return "`" + text.replace("`", "'").replace("|", "¦").replace("\n", "⏎") + "`"


# ------------------------------------------------------------------------------------ ablations


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
    _save_figure(fig, path)


# ------------------------------------------------------------------------------ causal tracing


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
        tr = causal_trace(model, tokens, spans, metric, kind=kind, window=window, noise_scale=ct.noise_scale,
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
    """Metric of the noised run (first noise draw of `causal_trace`) with every clean ``resid_pre 0`` restored."""
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
    _save_figure(fig, path)


def role_means(frame: pl.DataFrame) -> pl.DataFrame:
    """Mean IE per (kind, layer, role): over the role's positions within a prompt, then over prompts."""
    return (frame.group_by("kind", "layer", "role", "prompt").agg(pl.col("score").mean())
            .group_by("kind", "layer", "role").agg(pl.col("score").mean()).sort("kind", "layer", "role"))


# ------------------------------------------------------------------------------- stage functions


def run_analysis(cfg: AnalysisConfig | Mapping[str, Any], *, model_cfg: dict, dataset: Path, tokens: Path,
                 ablations: Path,
                 ablations_figure: Path, saliency: Path, saliency_figure: Path, neurons: Path, neurons_md: Path,
                 summary: Path, harvest_index: Path | list | None = None, causal_tracing: Path | list | None = None,
                 task: str = "task", loaded_model: Any = None) -> dict:
    """Stage function of rule `analyze` (steps 1-5 of the module docstring).

    Args:
        cfg: the ``analysis`` group.
        tokens: the run's corpus ``tokens.parquet`` (neuron contexts when the harvest lacks them).
        harvest_index: the run's harvest ``index.json`` when it holds ``mlp.hook_post`` hooks.
        causal_tracing: ``causal_tracing.parquet`` of the task, when it has one (summarised too).
        loaded_model: an already loaded LoadedModel or HookedTransformer (default: load ``model_cfg``).
    """
    c = AnalysisConfig.from_dict(cfg)
    harvest_index = _optional_path(harvest_index)
    causal_tracing = _optional_path(causal_tracing)
    model, tokenizer, name = _resolve_model(model_cfg, loaded_model)
    ds = TaskDataset.load(dataset)
    batch = select_batch(ds, c.n_prompts, dataset)
    bucket = _bucket(ds, batch)
    title = f"{name} × {task}"

    sal = saliency_table(model, batch, c, tokenizer)
    n_incomplete = check_completeness(sal, c, dataset)
    _write_parquet(sal, saliency)
    plot_saliency(sal, saliency_figure, f"{title}: integrated gradients per token ({c.ig_baseline} baseline)")

    neur = neurons_table(model, batch, c, tokens=tokens, harvest_index=harvest_index, tokenizer=tokenizer)
    _write_parquet(neur, neurons)
    atomic_write_text(neurons_md, neurons_markdown(pl.read_parquet(neurons), title))

    abl = ablations_table(model, batch, bucket, c)
    _write_parquet(abl, ablations)
    plot_ablations(pl.read_parquet(ablations), model.cfg.n_layers, model.cfg.n_heads, ablations_figure,
                   f"{title}: ablations ({len(batch)} prompts)")

    atomic_write_text(summary, analysis_markdown(title, ablations=ablations, saliency=saliency, neurons=neurons,
                                                 causal_tracing=causal_tracing))
    return {"n_prompts": len(batch), "ig_incomplete_prompts": n_incomplete,
            "ig_max_abs_residual": float(sal["ig_completeness_residual"].abs().max())}


def run_causal_tracing(cfg: CausalTracingConfig | Mapping[str, Any], *, model_cfg: dict, dataset: Path,
                       causal_tracing: Path, figure: Path,
                       task: str = "task", loaded_model: Any = None) -> dict:
    """Stage function of rule `causal_trace` (step 6 of the module docstring).

    Args:
        cfg: the ``causal_tracing`` group.
    """
    ct = CausalTracingConfig.from_dict(cfg)
    model, _, name = _resolve_model(model_cfg, loaded_model)
    ds = TaskDataset.load(dataset)
    if ds.kind not in SUBJECT_KINDS:
        raise ConfigError(f"{dataset}: task kind {ds.kind!r} has no subject positions; causal tracing runs for "
                          f"kinds {sorted(SUBJECT_KINDS)} only")
    batch = select_batch(ds, ct.n_prompts, dataset)
    frame = causal_tracing_table(model, batch, ct, dataset)
    _write_parquet(frame, causal_tracing)
    plot_causal_tracing(pl.read_parquet(causal_tracing), figure,
                        f"{name} × {task}: causal tracing ({len(batch)} prompts, {ct.n_samples} noise samples)")
    means = role_means(frame).sort("score", descending=True)
    return {"n_prompts": len(batch), "peak_indirect_effect": float(means["score"][0])}


def _optional_path(value: Path | list | None) -> Path | None:
    if isinstance(value, (list, tuple)):
        if len(value) > 1:
            raise ConfigError(f"expected at most one file, got {value}")
        value = value[0] if value else None
    return None if value is None else Path(value)


# ----------------------------------------------------------------------------------- analysis.md


def analysis_markdown(title: str, *, ablations: Path, saliency: Path, neurons: Path,
                      causal_tracing: Path | None = None) -> str:
    """analysis.md: every number read from the written Parquet files."""
    abl, sal, neur = pl.read_parquet(ablations), pl.read_parquet(saliency), pl.read_parquet(neurons)
    ig = sal.filter(pl.col("method") == "integrated_gradients")
    per = ig.unique("prompt").sort("prompt")
    n = per.height
    lines = [f"# Analysis: {title}", "",
             f"{n} prompt pairs (first of the largest equal-length bucket). Files in this folder: `ablations.parquet`, "
             "`saliency.parquet`, `neurons.parquet` (+ `neurons.md`)"
             + (", `causal_tracing.parquet`" if causal_tracing else "") + ".", ""]

    lines += ["## Ablations", "", ("Mean over prompts of m(ablated) − m(clean), per head (`hook_z`) and MLP "
              "(`hook_mlp_out`); `ablations.png`."), ""]
    if abl.height:
        means = abl.group_by("method", "component").agg(pl.col("score").mean())
        lines += ["| method | replacement | mean abs(Δ) over components | largest-abs(Δ) components |",
                  "|---|---|---|---|"]
        for method in dict.fromkeys(abl["method"].to_list()):
            m = means.filter(pl.col("method") == method).with_columns(pl.col("score").abs().alias("a"))
            top = m.sort("a", descending=True).head(5)
            ref = abl.filter(pl.col("method") == method)["reference"][0]
            lines.append(f"| {method} | {ref} | {m['a'].mean():.4f} | "
                         + ", ".join(f"{r['component']} {r['score']:+.4f}" for r in top.iter_rows(named=True)) + " |")
    else:
        lines.append("No ablation methods configured.")
    lines.append("")

    lines += ["## Token saliency", "",
              (f"Integrated gradients ({per['ig_steps'][0]} steps, {per['ig_baseline'][0]} baseline) on the input "
               "embeddings; completeness residual = Σ IG − (m − m_baseline)."), "",
              f"- mean m(clean) {per['metric'].mean():.4f}, mean m(baseline) {per['baseline_metric'].mean():.4f}",
              f"- max |completeness residual| {per['ig_completeness_residual'].abs().max():.3g} "
              f"(tolerance up to {per['ig_tolerance'].max():.3g}); prompts outside the tolerance: "
              f"{int((~per['ig_complete']).sum())} of {n}"
              + (" — **IG is incomplete for these prompts: raise ig_steps**" if not per["ig_complete"].all() else ""),
              ""]
    top_tok = (ig.with_columns(pl.col("score").abs().alias("a")).sort("a", descending=True)
               .unique("prompt", keep="first", maintain_order=True).sort("prompt").head(8))
    lines += ["| prompt | largest-abs(IG) token | position | IG |", "|---|---|---|---|"]
    for r in top_tok.iter_rows(named=True):
        tok = _md_escape(r["token"]) if r["token"] is not None else str(r["token_id"])
        lines.append(f"| {r['prompt']} | {tok} | {r['position']} | {r['score']:+.4f} |")
    lines.append("")

    sources = ", ".join(f"`{x}`" for x in neur["context_source"].unique().sort())
    lines += ["## Neurons", "", f"Top MLP neurons (contexts from {sources}; see `neurons.md`).", "",
              "| by | neuron | score | top context (activation) |", "|---|---|---|---|"]
    first = neur.filter(pl.col("context_rank") == 0).filter(pl.col("rank") < 5)
    for r in first.iter_rows(named=True):
        ctx = _md_escape(r["context"]) if r["context"] is not None else str(r["context_token_ids"])
        lines.append(f"| {r['method']} | L{r['layer']}N{r['neuron']} | {r['score']:+.4g} | "
                     f"{ctx} ({r['activation']:.3g}) |")
    lines.append("")

    if causal_tracing is not None:
        ct = pl.read_parquet(causal_tracing)
        pp = ct.unique("prompt").sort("prompt")
        means = role_means(ct)
        lines += ["## Causal tracing", "",
                  (f"Subject embeddings noised (σ = {ct['sigma'][0]:.4g}, noise samples: {ct['n_samples'][0]}); "
                   f"metric {ct['metric'][0]}: clean {pp['m_clean'].mean():.4f}, corrupted "
                   f"{pp['m_corrupted'].mean():.4f}, all clean states restored at layer 0: "
                   f"{pp['m_restore_all'].mean():.4f} (max |restored − clean| "
                   f"{(pp['m_restore_all'] - pp['m_clean']).abs().max():.2g})."), "",
                  "| restored | peak mean indirect effect | at (token role, layer) | last subject token peak |",
                  "|---|---|---|---|"]
        for kind in dict.fromkeys(ct["kind"].to_list()):
            m = means.filter(pl.col("kind") == kind).sort("score", descending=True)
            best = m.row(0, named=True)
            subj = m.filter(pl.col("role") == "last subject")
            s = subj.row(0, named=True) if subj.height else None
            lines.append(f"| {kind} | {best['score']:+.4f} | {best['role']}, layer {best['layer']} | "
                         + (f"{s['score']:+.4f} (layer {s['layer']})" if s else "—") + " |")
        lines.append("")
    return "\n".join(lines)
