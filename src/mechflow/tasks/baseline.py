"""Baseline of a task on a model: does the model do the task at all?

1. Forward clean and corrupted prompts (token-length buckets, ``batch_size`` at a time) and compute
   the task metric at the final position (:meth:`TaskBatch.metric`).
2. Accuracy = fraction of prompts with metric > 0 on the clean prompt (answer logit > wrong logit;
   for greater-than, P(greater) > P(not greater)).
3. Chance = a predictor with no preference among the candidate tokens (:func:`chance_metric`,
   :func:`chance_correct`): logit difference 0 and accuracy 0.5; for greater-than the uniform
   distribution over the year tokens.
4. Verdict "above chance" only if all hold; "INCONCLUSIVE: ..." when every point estimate favours
   the task but a test is not significant (too few prompts to tell); else "FAILS: <each failed check>":
   (a) accuracy exceeds chance accuracy, one-sided exact binomial test p < ``ALPHA``;
   (b) mean clean metric exceeds mean chance metric;
   (c) the clean prompt beats the corrupted one on more prompts than chance would give (paired
       sign test, p < ``ALPHA``): the corruption removes the information the task needs, which is
       what patching experiments rely on.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from scipy.stats import binomtest
from torch import Tensor
from tqdm.auto import tqdm

from mechflow.tasks.dataset import TaskDataset, chance_correct, chance_metric

log = logging.getLogger(__name__)

ALPHA = 0.01


@torch.no_grad()
def final_logits(model, tokens: Tensor) -> Tensor:
    """``[n, vocab]`` logits at the last position (unembeds one position instead of all)."""
    from transformer_lens.utilities.activation_functions import apply_softcap

    resid = model(tokens, stop_at_layer=model.cfg.n_layers)[:, -1:, :]
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    logits = apply_softcap(model.unembed(resid), model.cfg.output_logits_soft_cap)
    return logits[:, 0, :]


@dataclass
class Scores:
    """Per-prompt metric values, in dataset order."""

    example_ids: list
    clean: list[float]
    corrupted: list[float]


def score_dataset(model, dataset: TaskDataset, batch_size: int = 32) -> Scores:
    """Clean and corrupted metric of every example of `dataset` on `model`."""
    device = next(model.parameters()).device
    by_id: dict = {}
    batches = dataset.buckets(max_batch=batch_size)
    for batch in tqdm(batches, desc=f"baseline {dataset.name}", leave=False, disable=len(batches) < 4):
        batch = batch.to(device)
        clean = batch.metric(final_logits(model, batch.clean_tokens).double())
        corrupted = batch.metric(final_logits(model, batch.corrupted_tokens).double())
        for ex_id, c, k in zip(batch.example_ids, clean.tolist(), corrupted.tolist()):
            by_id[ex_id] = (c, k)
    ids = [it.id for it in dataset.examples]
    return Scores(ids, [by_id[i][0] for i in ids], [by_id[i][1] for i in ids])


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _verdict(failures: list[str], favourable: bool) -> str:
    if not failures:
        return "above chance"
    if favourable:
        return "INCONCLUSIVE (estimates favour the task, too few prompts for significance): " + "; ".join(failures)
    return "FAILS: " + "; ".join(failures)


def summarize(dataset: TaskDataset, scores: Scores) -> dict:
    """The baseline numbers and verdict (see module docstring)."""
    n = len(scores.clean)
    if not dataset.posable or n == 0:
        why = dataset.reason or "the dataset has no examples"
        return {"n_prompts": 0, "clean_metric_mean": None, "corrupted_metric_mean": None, "accuracy": None,
                "chance_accuracy": None, "chance_metric_mean": None, "p_value_accuracy": None,
                "p_value_clean_vs_corrupted": None, "verdict": f"FAILS: cannot be posed on this model: {why}"}
    kind = dataset.metric_kind
    n_correct = sum(v > 0 for v in scores.clean)
    chance_acc = _mean([chance_correct(it, kind) for it in dataset.examples])
    chance_m = _mean([chance_metric(it, kind) for it in dataset.examples])
    clean_mean, corrupted_mean = _mean(scores.clean), _mean(scores.corrupted)
    p_acc = float(binomtest(n_correct, n, min(max(chance_acc, 1e-12), 1 - 1e-12), alternative="greater").pvalue)
    wins = sum(c > k for c, k in zip(scores.clean, scores.corrupted))
    ties = sum(c == k for c, k in zip(scores.clean, scores.corrupted))
    p_pair = float(binomtest(wins, n - ties, 0.5, alternative="greater").pvalue) if n > ties else 1.0
    failures = []
    if not p_acc < ALPHA:
        failures.append(f"accuracy {n_correct / n:.3f} is not above chance {chance_acc:.3f} "
                        f"(binomial p={p_acc:.3g} >= {ALPHA}, n={n})")
    if not clean_mean > chance_m:
        failures.append(f"mean clean metric {clean_mean:.3f} is not above chance {chance_m:.3f}")
    if not p_pair < ALPHA:
        failures.append(f"clean beats corrupted on only {wins}/{n} prompts (sign test p={p_pair:.3g}): the "
                        "corruption does not remove the task's signal")
    return {
        "n_prompts": n,
        "clean_metric_mean": clean_mean,
        "corrupted_metric_mean": corrupted_mean,
        "clean_metric_std": math.sqrt(_mean([(v - clean_mean) ** 2 for v in scores.clean])),
        "accuracy": n_correct / n,
        "chance_accuracy": chance_acc,
        "chance_metric_mean": chance_m,
        "corrupted_accuracy": sum(v > 0 for v in scores.corrupted) / n,
        "clean_beats_corrupted": wins / n,
        "p_value_accuracy": p_acc,
        "p_value_clean_vs_corrupted": p_pair,
        "verdict": _verdict(failures, favourable=(n_correct / n > chance_acc and clean_mean > chance_m
                                                  and wins > (n - ties) / 2)),
    }
