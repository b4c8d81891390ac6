"""ACDC distance metrics: how far a circuit's output is from the full model's (0 = identical).

ACDC removes an edge when the DIFFERENCE ``D(circuit without the edge) - D(current circuit)`` is
below tau, never on the absolute value of D.

* ``kl`` (Conmy et al. 2023, the default of their IOI/docstring runs; auto-circuit's
  ``kl_div``): ``D = mean_i KL(p_clean,i || p_circuit,i)`` over prompts i, at the final (answer)
  position, ``KL(p || q) = sum_v p_v (log p_v - log q_v)``. The full model gives exactly 0.
* ``task``: ``D = |mean_i m_i(circuit) - mean_i m_i(full model)|`` with the task metric m (e.g.
  IOI logit difference). With f the MIB normalised faithfulness,
  ``D = |1 - f| * |m(N) - m(empty)|``: ACDC with this metric greedily keeps ``|1 - f|`` (the
  integrand of MIB's CMD) small. The batch mean is taken before the absolute value, as the
  faithfulness f is defined on the batch-mean metric.

Both are computed in float64 from final-position logits ``[K, n, vocab]`` (K candidate copies).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mechflow.benchmark.config import AcdcMetricName


def kl_to_clean(clean_logprobs: Tensor, last_logits: Tensor, _neg_entropy: Tensor | None = None) -> Tensor:
    """``[K]`` mean over prompts of KL(clean || circuit); ``clean_logprobs`` ``[n, vocab]``.

    Computed as ``sum p log p - sum p log q`` (terms with p = 0 contribute 0).
    """
    p = clean_logprobs.exp()
    if _neg_entropy is None:
        _neg_entropy = torch.where(p > 0, p * clean_logprobs, torch.zeros((), dtype=p.dtype)).sum(-1)
    lq = torch.log_softmax(last_logits.double(), dim=-1)
    return (_neg_entropy - (p * lq).sum(-1)).mean(-1)


class AcdcMetric:
    """Callable ``last_logits [K, n, vocab] -> D [K]`` (float64); ``name`` is ``kl`` or ``task``.

    Args:
        name: ``"kl"`` or ``"task"``.
        clean_last_logits: ``[n, vocab]`` final-position logits of the full model on the clean prompts.
        task_metric: per-prompt task metric ``logits [n, pos, vocab] -> [n]`` reading the final
            position (``PairBatch.metric``); needed for ``task``.
    """

    def __init__(self, name: AcdcMetricName, clean_last_logits: Tensor,
                 task_metric: Callable[[Tensor], Tensor] | None = None):
        self.name = name  # validated by the config (`AcdcConfig.metric`)
        self.clean_logprobs = torch.log_softmax(clean_last_logits.double(), dim=-1)
        p = self.clean_logprobs.exp()
        self._neg_entropy = torch.where(p > 0, p * self.clean_logprobs, torch.zeros((), dtype=p.dtype)).sum(-1)
        self.task_metric = task_metric
        if name == "task":
            if task_metric is None:
                raise ValueError("the task metric needs the batch's per-prompt metric")
            self.reference = self._task_mean(clean_last_logits)

    def _task_mean(self, last: Tensor) -> Tensor:
        return self.task_metric(last.unsqueeze(1)).double().mean()

    def __call__(self, last_logits: Tensor) -> Tensor:
        if self.name == "kl":
            return kl_to_clean(self.clean_logprobs, last_logits, self._neg_entropy)
        return torch.stack([(self._task_mean(copy) - self.reference).abs() for copy in last_logits])
