"""Neuron DLA (sums to the MLP's DLA), neuron attribution patching (finite differences) and
top-activating contexts from a real harvest (brute force)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mechflow.attribution.lens import direct_logit_attribution
from mechflow.attribution.neurons import (
    neuron_attribution_patching,
    neuron_dla,
    top_activating_contexts,
    top_neurons,
)
from mechflow.corpus import contexts_table
from mechflow.harvest import harvest
from mechflow.testing import add_random_biases, make_tiny_llama

N, POS = 3, 6


@pytest.fixture(scope="module")
def biased_llama():
    model = make_tiny_llama(seed=4)
    add_random_biases(model, seed=2, attn=False, unembed=False)
    return model


def _tokens(seed):
    return torch.randint(0, 50, (N, POS), generator=torch.Generator().manual_seed(seed))


def metric(logits):
    return logits[:, -1, 4] - logits[:, -1, 6]


def test_neuron_dla_sums_to_mlp_dla(biased_llama):
    toks = _tokens(0)
    ans, wrong = torch.tensor([1, 2, 3]), torch.tensor([7, 8, 9])
    nd = neuron_dla(biased_llama, toks, ans, wrong)
    dla = direct_logit_attribution(biased_llama, toks, ans, wrong)
    assert nd.neurons.shape == (2, 64, N)
    torch.testing.assert_close(nd.mlp_total(), dla.mlps, rtol=0, atol=1e-12)
    assert nd.bias.abs().min() > 0
    only1 = neuron_dla(biased_llama, toks, ans, wrong, layers=[1])
    torch.testing.assert_close(only1.neurons[0], nd.neurons[1], rtol=0, atol=0)
    top = nd.top(5)
    assert top.height == 5 and top["score"].abs().to_list() == sorted(top["score"].abs().to_list(), reverse=True)
    best = top.row(0, named=True)
    assert abs(best["score"] - float(nd.neurons[best["layer"], best["neuron"]].mean())) < 1e-12


def test_neuron_attribution_patching_is_the_directional_derivative(biased_llama):
    clean, corr = _tokens(1), _tokens(2)
    ap = neuron_attribution_patching(biased_llama, clean, corr, metric, per_prompt=True)
    assert ap.shape == (2, 64, N)
    _, cc = biased_llama.run_with_cache(clean)
    _, kc = biased_llama.run_with_cache(corr)
    for layer, i in [(0, 5), (1, 17), (1, 40)]:
        name = f"blocks.{layer}.mlp.hook_post"
        delta = kc[name][:, :, i] - cc[name][:, :, i]

        def f(t, i=i, delta=delta, name=name):
            def hook(act, hook):
                act[:, :, i] = act[:, :, i] + t * delta
                return act
            return metric(biased_llama.run_with_hooks(clean, fwd_hooks=[(name, hook)]))

        h = 1e-5
        torch.testing.assert_close(ap[layer, i], (f(h) - f(-h)) / (2 * h), rtol=1e-6, atol=1e-9)
    den = neuron_attribution_patching(biased_llama, clean, corr, metric, direction="denoising")
    assert den.shape == (2, 64)


def test_top_activating_contexts_match_brute_force(tmp_path, biased_llama):
    rng = np.random.default_rng(0)
    ctx = rng.integers(2, 50, (9, 10))
    ctx[:, 0] = 1
    tokens = tmp_path / "tokens.parquet"
    pq.write_table(contexts_table(ctx), tokens)
    harvest({"hooks": ["blocks.1.mlp.hook_post"], "batch_size": 4, "shard_rows": 30, "row_group_rows": 7,
             "progress": False}, model_cfg={"name": "tiny", "prepend_bos": True}, tokens=tokens,
            index=tmp_path / "h" / "index.json", harvest_dir=tmp_path / "h" / "shards", loaded_model=biased_llama)
    neurons = [3, 20]
    df = top_activating_contexts(tmp_path / "h" / "index.json", neurons, k=4, window=3, batch_rows=11)
    with torch.no_grad():
        _, cache = biased_llama.run_with_cache(torch.tensor(ctx))
    post = cache["blocks.1.mlp.hook_post"].float()  # harvest stores float32
    for neuron in neurons:
        flat = post[:, :, neuron].flatten()
        vals, idx = flat.topk(4)
        got = df.filter(df["neuron"] == neuron).sort("rank")
        np.testing.assert_allclose(got["activation"].to_numpy(), vals.numpy(), rtol=1e-6)
        for r, i in enumerate(idx.tolist()):
            c, p = divmod(i, 10)
            row = got.row(r, named=True)
            assert (row["context_id"], row["position"], row["token_id"]) == (c, p, int(ctx[c, p]))
            assert row["context_token_ids"] == [int(t) for t in ctx[c, max(0, p - 3):p + 1]]


def test_top_neurons_rejects_bad_order():
    from mechflow.errors import ConfigError

    with pytest.raises(ConfigError, match="neurons.by"):
        top_neurons(torch.zeros(2, 3), 2, "x", by="largest")
