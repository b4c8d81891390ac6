"""Attribution patching and IG patching against exact patching and finite differences."""

from __future__ import annotations

import pytest
import torch

from mechflow.attribution.gradients import attribution_patching, ig_points, integrated_gradients_patching
from mechflow.attribution.patching import TokenPairs, exact_patching, hook_name, patch_whole_layer
from mechflow.errors import ConfigError
from mechflow.testing import make_tiny_llama


def make_batch(seed: int, n: int = 3, pos: int = 6, vocab: int = 50) -> TokenPairs:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (n, pos), generator=g)
    corr = torch.randint(0, vocab, (n, pos), generator=g)
    return TokenPairs(clean, corr, lambda logits: logits[:, -1, 3] - logits[:, -1, 7])


@pytest.fixture(scope="module")
def linear_tail_model():
    """Tiny llama whose metric is exactly linear in the last layer's head outputs: the final norm
    is the identity and the last MLP writes zero, so z -> W_O -> residual -> W_U is linear."""
    model = make_tiny_llama(seed=3)
    model.ln_final = torch.nn.Identity()
    with torch.no_grad():
        model.blocks[-1].mlp.W_out.zero_()
    return model


@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_ap_equals_exact_patching_where_metric_is_linear(linear_tail_model, direction):
    batch = make_batch(seed=4)
    ap = attribution_patching(linear_tail_model, batch, "head", direction)
    ex = exact_patching(linear_tail_model, batch, "head", direction)
    torch.testing.assert_close(ap[-1], ex[-1], rtol=1e-9, atol=1e-10)
    assert ex[-1].abs().max() > 1e-2
    # layer 0 reaches the metric through attention softmax and the gated MLP: not linear
    assert (ap[0] - ex[0]).abs().max() > 1e-4


@pytest.mark.parametrize("component", ["head", "mlp", "resid"])
def test_ap_is_directional_derivative_by_finite_differences(tiny_llama, component):
    """AP = d/de m(a + e (a_src - a)) at e = 0, gradients through all later layers."""
    batch = make_batch(seed=5)
    ap = attribution_patching(tiny_llama, batch, component)
    name = hook_name(component, 0)
    _, cache = tiny_llama.run_with_cache(batch.corrupted_tokens, names_filter=lambda n: n == name)
    _, base_cache = tiny_llama.run_with_cache(batch.clean_tokens, names_filter=lambda n: n == name)
    delta = cache[name] - base_cache[name]
    sub = {"head": (slice(None), slice(None), 1), "mlp": (slice(None),), "resid": (slice(None), 3)}[component]
    mask = torch.zeros_like(delta)
    mask[sub] = 1.0
    eps = 1e-6

    def run(e):
        def hook(act, hook):
            return act + e * delta * mask
        with torch.no_grad():
            return batch.metric(tiny_llama.run_with_hooks(batch.clean_tokens, fwd_hooks=[(name, hook)])).mean()

    fd = (run(eps) - run(-eps)) / (2 * eps)
    idx = {"head": (0, 1), "mlp": (0,), "resid": (0, 3)}[component]
    assert ap[idx].item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-9)
    assert abs(fd.item()) > 1e-4


def test_ig_converges_to_exact_patching_and_is_complete(tiny_llama):
    batch = make_batch(seed=6)
    ig_mlp = integrated_gradients_patching(tiny_llama, batch, "mlp", steps=48)
    torch.testing.assert_close(ig_mlp, exact_patching(tiny_llama, batch, "mlp"), rtol=1e-3, atol=1e-5)
    ig_heads = integrated_gradients_patching(tiny_llama, batch, "head", steps=48, max_batch=20)
    for L in range(tiny_llama.cfg.n_layers):
        whole = patch_whole_layer(tiny_llama, batch, "head", L).mean()
        assert ig_heads[L].sum().item() == pytest.approx(whole.item(), rel=1e-3, abs=1e-5)
    # midpoint error shrinks ~ steps^-2: coarse IG is further from the exact value
    coarse = integrated_gradients_patching(tiny_llama, batch, "mlp", steps=2)
    ex = exact_patching(tiny_llama, batch, "mlp")
    assert (coarse - ex).abs().max() > (ig_mlp - ex).abs().max()


def test_ig_single_left_point_is_ap(tiny_llama):
    batch = make_batch(seed=7)
    torch.testing.assert_close(
        integrated_gradients_patching(tiny_llama, batch, "resid", steps=1, rule="left"),
        attribution_patching(tiny_llama, batch, "resid"), rtol=1e-10, atol=1e-12)


def test_ig_points_and_errors():
    torch.testing.assert_close(ig_points(4), torch.tensor([0.125, 0.375, 0.625, 0.875], dtype=torch.float64))
    with pytest.raises(ConfigError, match="ig_steps"):
        ig_points(0)
    with pytest.raises(ConfigError, match="ig_rule"):
        ig_points(3, "simpson")
