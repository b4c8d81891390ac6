"""What an intervention does, measured in the real model: the target metric on held-out positive
prompts, and its side effects.

* **Target**: the task metric (`mechflow.tasks.dataset.TaskBatch.metric`: logit or probability
  difference at the final position) of each held-out positive (clean) prompt, unsteered and steered;
  the *normalised effect* is the mean change divided by the held-out gap ``mean(positive) -
  mean(negative)`` of the unsteered metric (-1: the steered positives score, on average, like the
  negatives), plus accuracy before / after and the flip rate (share of prompts whose answer, the
  sign of the metric, changes).
* **Side effects**: KL(unsteered || steered) of the next-token distribution at the final position of
  the held-out negative (corrupted) prompts; next-token CE and KL on corpus text steered at *every*
  position (`mechflow.dictionaries.metrics.ce_metrics`: what generation with the steer pays, since
  a cached generation steers each new token; the corpus's first contexts, cut to
  ``corpus_tokens``); the mean metric of every other task's clean prompts,
  its change as a share of that task's clean - corrupted gap.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechflow.steer.interventions import Hook, Intervention
from mechflow.tasks.dataset import TaskItem, make_batch


@dataclass
class PromptSet:
    """Prompts of one task in one role: ``positive`` (clean prompts) or ``negative`` (corrupted ones)."""

    task: str
    role: str
    dataset: str
    dataset_sha256: str
    metric_kind: str
    items: list[TaskItem]

    @property
    def ids(self) -> list:
        return [it.id for it in self.items]

    def padded(self, max_batch: int) -> list[tuple[list[int], Any, Tensor]]:
        """(row indices into `items`, TaskBatch, last position ``[n]``) of up to `max_batch` prompts each,
        right-padded to the longest (with each prompt's own first token).

        Exact for a causal model: a position never attends to the padding after it, so the logits at
        each prompt's last position, and every activation up to it, are the unpadded ones. One
        forward pass per batch instead of one per token length (the per-pass cost dominates on CPU).
        """
        order = sorted(range(len(self.items)), key=lambda i: (self.items[i].n_tokens, i))
        out = []
        for a in range(0, len(order), max_batch):
            rows = order[a:a + max_batch]
            width = max(self.items[i].n_tokens for i in rows)
            items = []
            for i in rows:
                it = self.items[i]
                pad = [it.clean_ids[0]] * (width - it.n_tokens)
                items.append(replace(it, clean_ids=it.clean_ids + pad, corrupted_ids=it.corrupted_ids + pad))
            last = torch.tensor([self.items[i].n_tokens - 1 for i in rows])
            out.append((rows, make_batch(items, self.metric_kind), last))
        return out

    def batches(self, max_batch: int) -> list[tuple[list[int], Any]]:
        """(row indices into `items`, TaskBatch) of equal token length."""
        groups: dict[int, list[int]] = defaultdict(list)
        for i, it in enumerate(self.items):
            groups[it.n_tokens].append(i)
        out = []
        for length in sorted(groups):
            rows = groups[length]
            for a in range(0, len(rows), max_batch):
                chunk = rows[a:a + max_batch]
                out.append((chunk, make_batch([self.items[i] for i in chunk], self.metric_kind)))
        return out

    def spec(self) -> dict:
        return {"task": self.task, "role": self.role, "dataset": self.dataset, "dataset_sha256": self.dataset_sha256,
                "ids": self.ids}


@dataclass
class Scores:
    """Per prompt: the metric and the final-position log-probabilities."""

    metric: Tensor  # [n] float64
    logp: Tensor  # [n, vocab] float64

    @property
    def correct(self) -> Tensor:
        return self.metric > 0


@torch.no_grad()
def last_logits(model: Any, tokens: Tensor, last: Tensor, hooks: Sequence[Hook]) -> Tensor:
    """``[n, vocab]`` logits at position ``last[i]`` of each row: the final residual stream of those
    positions through the final norm (per position) and the unembedding, so only they are unembedded."""
    store: dict[str, Tensor] = {}

    def grab(x: Tensor, hook: Any = None) -> Tensor:
        store["x"] = x[torch.arange(len(x)), last]
        return x

    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    model.run_with_hooks(tokens, return_type=None, fwd_hooks=[*hooks, (final, grab)])
    return model.unembed(model.ln_final(store["x"][:, None]))[:, 0]


@torch.no_grad()
def score(model: Any, prompts: PromptSet, iv: Intervention | None = None, max_batch: int = 64) -> Scores:
    """The metric of every prompt (clean tokens for positives, corrupted for negatives) with `iv` on."""
    n = len(prompts.items)
    metric = torch.zeros(n, dtype=torch.float64)
    logp: Tensor | None = None
    for rows, batch, last in prompts.padded(max_batch):
        tokens = batch.clean_tokens if prompts.role == "positive" else batch.corrupted_tokens
        hooks = iv.hooks(last) if iv is not None else ()
        logits = last_logits(model, tokens, last, hooks).double()
        if logp is None:
            logp = torch.zeros(n, logits.shape[-1], dtype=torch.float64)
        metric[rows] = batch.metric(logits)
        logp[rows] = logits.log_softmax(-1)
    return Scores(metric, logp if logp is not None else torch.zeros(0, 0, dtype=torch.float64))


def kl(before: Tensor, after: Tensor) -> Tensor:
    """KL(before || after) per row of log-probabilities, in nats."""
    return (before.exp() * (before - after)).sum(-1).clamp_min(0)


@dataclass
class Baseline:
    """The unsteered scores the sweep compares with (computed once)."""

    positive: Scores
    negative: Scores
    others: dict[str, tuple[PromptSet, Scores, float]]  # task -> (its clean prompts, scores, clean-corrupted gap)
    corpus: Tensor | None = None  # [n, T] corpus tokens
    corpus_logp: list[Tensor] = field(default_factory=list)  # unsteered next-token log-probs per batch (float32)
    corpus_ce: float = float("nan")
    corpus_batch: int = 8

    @property
    def gap(self) -> float:
        return float(self.positive.metric.mean() - self.negative.metric.mean())


def baseline(model: Any, positive: PromptSet, negative: PromptSet, others: Sequence[tuple[PromptSet, PromptSet]],
             max_batch: int, corpus: Tensor | None = None, corpus_batch: int = 8) -> Baseline:
    """Unsteered scores of every prompt set and of the corpus (its log-probs kept for the KL)."""
    out = {}
    for clean, corrupted in others:
        s = score(model, clean, None, max_batch)
        gap = float(s.metric.mean() - score(model, corrupted, None, max_batch).metric.mean())
        out[clean.task] = (clean, s, gap)
    base = Baseline(score(model, positive, None, max_batch), score(model, negative, None, max_batch), out, corpus,
                    corpus_batch=corpus_batch)
    if corpus is not None:
        ce, logps, _ = corpus_next_token(model, corpus, (), corpus_batch)
        base.corpus_logp, base.corpus_ce = logps, ce
    return base


@torch.no_grad()
def corpus_next_token(model: Any, corpus: Tensor, hooks: Sequence[Hook], batch: int,
                      reference: Sequence[Tensor] = ()) -> tuple[float, list[Tensor], float]:
    """Mean next-token CE (nats) of `corpus` under `hooks`, the log-probs per batch, and the mean
    KL(reference || these) when `reference` log-probs are given.

    Written here rather than through `mechflow.dictionaries.metrics.ce_metrics`, which re-runs the
    unsteered model on every call: a sweep compares many strengths with one unsteered pass.
    """
    ce_sum, kl_sum, count, logps = 0.0, 0.0, 0, []
    for j, i in enumerate(range(0, len(corpus), batch)):
        tok = corpus[i:i + batch]
        logits = model.run_with_hooks(tok, return_type="logits", fwd_hooks=list(hooks))[:, :-1]
        logp = logits.float().log_softmax(-1)
        ce_sum += float(-logp.gather(-1, tok[:, 1:, None]).double().sum())
        count += tok[:, 1:].numel()
        if reference:
            ref = reference[j]
            kl_sum += float((ref.exp() * (ref - logp)).sum(-1).double().sum())
        else:
            logps.append(logp)
    return ce_sum / count, logps, kl_sum / count


def target_effect(base: Baseline, after: Scores) -> dict:
    """The target block of a record: per-prompt metric before / after and their summaries."""
    before = base.positive.metric
    change = float((after.metric - before).mean())
    gap = base.gap
    return {"before": before.tolist(), "after": after.metric.tolist(), "before_mean": float(before.mean()),
            "after_mean": float(after.metric.mean()), "effect": change,
            "normalized_effect": change / gap if gap else None, "gap": gap,
            "accuracy_before": float(base.positive.correct.double().mean()),
            "accuracy_after": float(after.correct.double().mean()),
            "flip_rate": float((after.correct != base.positive.correct).double().mean())}


@dataclass
class SideEffects:
    negative_kl: Tensor
    negative_metric: Tensor
    corpus: dict | None
    others: list[dict] = field(default_factory=list)

    def to_dict(self, base: Baseline) -> dict:
        return {"negative": {"kl": self.negative_kl.tolist(), "kl_mean": float(self.negative_kl.mean()),
                             "metric_before_mean": float(base.negative.metric.mean()),
                             "metric_after_mean": float(self.negative_metric.mean())},
                "corpus": self.corpus, "other_tasks": self.others}


def side_effects(model: Any, iv: Intervention, base: Baseline, negative: PromptSet, max_batch: int) -> SideEffects:
    neg = score(model, negative, iv, max_batch)
    corpus_block = None
    if base.corpus is not None:
        everywhere = replace(iv, positions="all")
        ce, _, kl_mean = corpus_next_token(model, base.corpus, everywhere.hooks(), base.corpus_batch,
                                           base.corpus_logp)
        corpus_block = {"n_contexts": int(base.corpus.shape[0]),
                        "n_predictions": int(base.corpus[:, 1:].numel()), "ce_before": base.corpus_ce,
                        "ce_after": ce, "ce_increase": ce - base.corpus_ce, "kl": kl_mean}
    others = []
    for task, (clean, s, gap) in base.others.items():
        after = score(model, clean, iv, max_batch)
        change = float((after.metric - s.metric).mean())
        others.append({"task": task, "dataset_sha256": clean.dataset_sha256, "n_prompts": len(clean.items),
                       "metric_before_mean": float(s.metric.mean()), "metric_after_mean": float(after.metric.mean()),
                       "change": change, "normalized_change": change / gap if gap else None})
    return SideEffects(kl(base.negative.logp, neg.logp), neg.metric, corpus_block, others)


def within_bounds(side: dict, cfg: Any) -> tuple[bool, list[str]]:
    """Whether the side effects are inside the configured bounds, and which bounds failed."""
    failed = []
    if side["negative"]["kl_mean"] > cfg.max_negative_kl:
        failed.append(f"negative-prompt KL {side['negative']['kl_mean']:.3g} > {cfg.max_negative_kl}")
    corpus = side.get("corpus")
    if corpus is not None and corpus["ce_increase"] > cfg.max_ce_increase:
        failed.append(f"corpus CE +{corpus['ce_increase']:.3g} > {cfg.max_ce_increase}")
    for o in side.get("other_tasks", []):
        nc = o["normalized_change"]
        if nc is not None and abs(nc) > cfg.max_other_task_change:
            failed.append(f"{o['task']} metric changed {nc:+.3g} of its gap (bound {cfg.max_other_task_change})")
    return not failed, failed


def reaches(effect: float | None, target: float) -> bool:
    if effect is None:
        return False
    return effect <= target if target < 0 else effect >= target


def choose(rows: Sequence[dict], target: float) -> tuple[dict | None, str]:
    """The weakest strength that reaches `target` within the side-effect bounds, and why (or why none).

    Each row: ``{"alpha", "strength", "normalized_effect", "within_bounds", "failed"}``.
    """
    reached = [r for r in rows if reaches(r["normalized_effect"], target)]
    ok = sorted((r for r in reached if r["within_bounds"]), key=lambda r: (r["strength"], abs(r["alpha"])))
    if ok:
        r = ok[0]
        return r, f"weakest strength reaching normalised effect {target:+g} within the side-effect bounds"
    if not reached:
        best = max((r["normalized_effect"] for r in rows if r["normalized_effect"] is not None),
                   key=lambda e: -e if target < 0 else e, default=None)
        return None, (f"no strength reached normalised effect {target:+g} (the most extreme was "
                      f"{best:+.3g})" if best is not None else "no strength was measured")
    fails = "; ".join(f"alpha {r['alpha']:g}: {', '.join(r['failed'])}" for r in reached)
    return None, f"every strength reaching {target:+g} broke a side-effect bound ({fails})"


def weakest_reaching(rows: Sequence[dict], target: float) -> dict | None:
    """The weakest strength whose normalised effect reaches `target`, side effects aside."""
    reached = sorted((r for r in rows if reaches(r["normalized_effect"], target)),
                     key=lambda r: (r["strength"], abs(r["alpha"])))
    return reached[0] if reached else None


def strongest(rows: Sequence[dict], target: float) -> dict | None:
    """The row whose normalised effect goes furthest in the target's direction."""
    rows = [r for r in rows if r["normalized_effect"] is not None]
    if not rows:
        return None
    return max(rows, key=lambda r: -r["normalized_effect"] if target < 0 else r["normalized_effect"])


def percentile(value: float, controls: Sequence[float], target: float) -> float:
    """Share (in %) of control effects less extreme than `value` in the target's direction."""
    if not controls:
        return float("nan")
    sign = -1.0 if target < 0 else 1.0
    return 100.0 * sum(sign * c < sign * value for c in controls) / len(controls)


@torch.no_grad()
def generate(model: Any, tokens: Tensor, hooks: Sequence[Hook], max_new_tokens: int) -> Tensor:
    """Greedy continuation of ``tokens [1, pos]`` with the hooks on (TransformerLens `generate`, KV cache)."""
    with model.hooks(fwd_hooks=list(hooks)):
        out = model.generate(tokens, max_new_tokens=max_new_tokens, do_sample=False, stop_at_eos=False,
                             use_past_kv_cache=True, verbose=False, return_type="tokens")
    return out[0, tokens.shape[1]:]


def corpus_tokens(path: Path, n_contexts: int, n_tokens: int) -> Tensor:
    """The first `n_contexts` contexts of the corpus `tokens.parquet`, cut to `n_tokens` tokens."""
    from mechflow.corpus.core import read_contexts

    ctx = read_contexts(Path(path))
    return torch.as_tensor(ctx[:n_contexts, :n_tokens], dtype=torch.long)
