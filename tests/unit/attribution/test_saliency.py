"""Token saliency on the tiny llama (float64): finite differences and IG completeness."""

from __future__ import annotations

import pytest
import torch

from mechflow.attribution.saliency import (
    gradient_saliency,
    input_embeddings,
    integrated_gradients,
    metric_at_embeddings,
)
from mechflow.errors import ConfigError

N, POS = 2, 6
ANS, WRONG = torch.tensor([3, 7]), torch.tensor([11, 13])


def metric(logits):
    last = logits[:, -1]
    return last[torch.arange(last.shape[0]), ANS] - last[torch.arange(last.shape[0]), WRONG]


def _tokens(seed):
    return torch.randint(0, 50, (N, POS), generator=torch.Generator().manual_seed(seed))


def test_gradient_matches_central_finite_differences(tiny_llama):
    toks = _tokens(0)
    grad, gxi = gradient_saliency(tiny_llama, toks, metric)
    e = input_embeddings(tiny_llama, toks)
    g = torch.Generator().manual_seed(5)
    for pos in (0, 3, POS - 1):
        v = torch.zeros_like(e)
        v[:, pos] = torch.randn(N, e.shape[-1], generator=g, dtype=e.dtype)
        h = 1e-5
        with torch.no_grad():
            fd = (metric_at_embeddings(tiny_llama, toks, e + h * v, metric)
                  - metric_at_embeddings(tiny_llama, toks, e - h * v, metric)) / (2 * h)
        e_req = e.clone().requires_grad_(True)
        m = metric_at_embeddings(tiny_llama, toks, e_req, metric)
        (full,) = torch.autograd.grad(m.sum(), [e_req])
        torch.testing.assert_close((full * v).sum((1, 2)), fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad.scores, full.norm(dim=-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(gxi.scores, (full * e).sum(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(grad.metric, metric(tiny_llama(toks)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("baseline,grid", [("corrupted", (2, 8, 32)), ("zero", (8, 32, 128))])
def test_ig_completeness_error_shrinks_with_steps(tiny_llama, baseline, grid):
    """Zero baseline uses the warped path (t = u^4): the RMSNorm spike near e = 0 needs it."""
    toks, corr = _tokens(1), _tokens(2)
    errors = []
    for steps in grid:
        res = integrated_gradients(tiny_llama, toks, metric, baseline=baseline, corrupted_tokens=corr, steps=steps)
        errors.append(res.completeness_error.abs().max().item())
    if baseline == "corrupted":
        torch.testing.assert_close(res.baseline_metric, metric(tiny_llama(corr)), rtol=0, atol=1e-12)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 2e-2 * res.metric.sub(res.baseline_metric).abs().max().item()
    assert errors[2] < errors[1] / 6  # midpoint rule: O(steps^-2) once the integrand is resolved
    assert res.to_frame(toks).height == N * POS


def test_ig_rejects_bad_baseline(tiny_llama):
    with pytest.raises(ConfigError, match="saliency.baseline"):
        integrated_gradients(tiny_llama, _tokens(0), metric, baseline="uniform")
    with pytest.raises(ConfigError, match="corrupted_tokens"):
        integrated_gradients(tiny_llama, _tokens(0), metric, baseline="corrupted")
