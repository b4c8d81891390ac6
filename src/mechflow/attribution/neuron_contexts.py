"""Step 3 of rule ``analyze``: top MLP neurons of a task and their top-activating contexts.

The ``top_neurons`` MLP neurons by |direct logit attribution| (Geva et al. 2022) and by
|attribution patching| (noising; Nanda 2023), each with its ``contexts_per_neuron`` top-activating
contexts. Source of the contexts (decision): the harvest when the run harvests that layer's
``blocks.L.mlp.hook_post`` (its whole corpus, streamed); otherwise, as with the default harvest
(residual and MLP in/out only), a forward pass over the first ``context_tokens`` tokens of the run's
corpus (``corpus/tokens.parquet``) stopped after the last layer needed. Both give the same rows on
the same contexts (tested); the ``context_source`` column says which was used. The BOS position
counts like any other (as in the harvest reader), so attention-sink neurons show it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from mechflow.attribution.config import AnalysisConfig
from mechflow.attribution.neurons import (
    neuron_attribution_patching,
    neuron_dla,
    top_activating_contexts,
    top_neurons,
)
from mechflow.contracts.documents import read_document
from mechflow.contracts.harvest import HarvestIndex
from mechflow.contracts.hooks import NEURON_HOOK
from mechflow.errors import DataError
from mechflow.tasks import TaskBatch

log = logging.getLogger(__name__)


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
                f"{md_escape(x['context'] if x['context'] is not None else str(x['context_token_ids']))} "
                f"({x['activation']:.3g})" for x in g.iter_rows(named=True))
            out.append(f"| {rank} | L{r['layer']}N{r['neuron']} | {r['score']:+.4g} | {r['dla_score']:+.4g} | "
                       f"{r['ap_score']:+.4g} | {ctx} |")
        out.append("")
    return "\n".join(out)


def md_escape(text: str) -> str:
    """`text` as one markdown table cell (inline code, no pipes or newlines)."""
    return "`" + text.replace("`", "'").replace("|", "¦").replace("\n", "⏎") + "`"
