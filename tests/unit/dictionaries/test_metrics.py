"""Dictionary metrics against brute force (EV, outliers, dead/dense) and explicit-hook CE/KL."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dictionary_shards import write_shards, write_tokens

from mechflow.dictionaries.data import ShardSource
from mechflow.dictionaries.metrics import ce_metrics, evaluate_dictionary, reconstruction_metrics, sae_splice_hooks

HOOK = "blocks.0.hook_resid_post"


def _random_sae(d_in=32, d_sae=64, seed=0):
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.2)
        sae.W_dec.copy_(sae.W_enc.T.clone() * 0.8)
        sae.b_dec.normal_(0, 0.05)
    return sae.eval()


def test_explained_variance_with_and_without_outliers_matches_numpy(tmp_path):
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(6, 10, 8)).astype(np.float32) + 2.0
    acts[2, 3] *= 40  # two massive-norm positions, far above 5x the median norm
    acts[4, 7] *= 60
    m = write_shards(tmp_path / "h", acts, contexts_per_shard=2, row_group_rows=7)
    W = torch.from_numpy(rng.normal(size=(8, 8)).astype(np.float32) * 0.1)

    def dictionary(x):
        latents = torch.stack([torch.zeros(len(x)), torch.ones(len(x)), (x[:, 0] > 2).float()], 1)
        return latents, x + x @ W

    got = reconstruction_metrics(dictionary, ShardSource([m]), {"batch_size": 7, "dead_min_tokens": 10,
                                                                "dense_threshold": 0.9})
    x = acts[:, 1:].reshape(-1, 8).astype(np.float64)  # BOS (position 0) excluded
    err = ((x @ W.double().numpy()) ** 2).sum(1)
    norms = np.linalg.norm(x, axis=1)
    inl = norms <= 5 * np.median(norms)
    assert (~inl).sum() == 2 == got["n_outliers"]
    for mask, key in ((inl, "explained_variance"), (np.ones_like(inl), "explained_variance_with_outliers")):
        ref = 1 - err[mask].sum() / ((x[mask] - x[mask].mean(0)) ** 2).sum()
        assert got[key] == pytest.approx(ref, rel=1e-6)  # recon is float32
    assert got["fvu"] == pytest.approx(1 - got["explained_variance"])
    assert got["explained_variance"] != pytest.approx(got["explained_variance_with_outliers"], abs=1e-3)
    frac2 = (x[:, 0] > 2).mean()
    assert got["l0"] == pytest.approx(1 + frac2, rel=1e-9)
    assert got["dead_features"] == 1 and got["dense_features"] == 1 + int(frac2 > 0.9)
    torch.testing.assert_close(got["_mean_target"].double(), torch.from_numpy(x.mean(0)), rtol=1e-6, atol=1e-6)


def _manual_ce_kl(model, tokens, fwd_hooks, clean_logits):
    logits = model.run_with_hooks(tokens, return_type="logits", fwd_hooks=fwd_hooks) if fwd_hooks else clean_logits
    V = logits.shape[-1]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V).double(), tokens[:, 1:].reshape(-1)).item()
    logq = F.log_softmax(logits[:, :-1].double(), -1).reshape(-1, V)
    logp = F.log_softmax(clean_logits[:, :-1].double(), -1).reshape(-1, V)
    kl = F.kl_div(logq, logp, log_target=True, reduction="sum").item() / logq.shape[0]
    return ce, kl


def test_ce_recovered_matches_hand_computation(tiny_llama):
    model = tiny_llama
    sae = _random_sae()
    tokens = torch.randint(0, 50, (6, 12), generator=torch.Generator().manual_seed(1))
    mean = torch.randn(32, generator=torch.Generator().manual_seed(2))

    def splice(act, hook):
        out = act.clone()
        flat = act[:, 1:].float()
        out[:, 1:] = sae.decode(sae.encode(flat)).to(act.dtype)
        return out

    def zero(act, hook):
        out = act.clone()
        out[:, 1:] = 0.0
        return out

    def mean_abl(act, hook):
        out = act.clone()
        out[:, 1:] = mean.to(act.dtype)
        return out

    with torch.no_grad():
        clean = model(tokens, return_type="logits")
        ce_clean, _ = _manual_ce_kl(model, tokens, None, clean)
        ce_sp, kl_sp = _manual_ce_kl(model, tokens, [(HOOK, splice)], clean)
        ce_zero, kl_zero = _manual_ce_kl(model, tokens, [(HOOK, zero)], clean)
        ce_mean, kl_mean = _manual_ce_kl(model, tokens, [(HOOK, mean_abl)], clean)
        got = ce_metrics(model, tokens, sae_splice_hooks(sae, HOOK, mean, start=1), batch_size=4)
    assert got["ce_clean"] == pytest.approx(ce_clean, rel=1e-10)
    assert got["ce_spliced"] == pytest.approx(ce_sp, rel=1e-6)
    assert got["ce_zero"] == pytest.approx(ce_zero, rel=1e-10)
    assert got["ce_mean"] == pytest.approx(ce_mean, rel=1e-10)
    assert got["kl_spliced"] == pytest.approx(kl_sp, rel=1e-5)
    assert got["ce_recovered_zero"] == pytest.approx((ce_zero - ce_sp) / (ce_zero - ce_clean), rel=1e-5)
    assert got["ce_recovered_mean"] == pytest.approx((ce_mean - ce_sp) / (ce_mean - ce_clean), rel=1e-5)
    assert got["kl_score_zero"] == pytest.approx((kl_zero - kl_sp) / kl_zero, rel=1e-5)
    assert got["kl_score_mean"] == pytest.approx((kl_mean - kl_sp) / kl_mean, rel=1e-5)
    assert ce_sp != pytest.approx(ce_clean, rel=1e-3)  # the splice really changes the output


def test_evaluate_dictionary_stage_on_tiny_llama(tiny_llama, tmp_path):
    model = tiny_llama
    tokens = torch.randint(0, 50, (8, 10), generator=torch.Generator().manual_seed(3))
    tokens[:, 0] = 1  # a BOS-like first token
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    acts = cache[HOOK].float().numpy()
    m = write_shards(tmp_path / "h", acts, hook=HOOK, contexts_per_shard=2, tokens=tokens.numpy())
    tok_path = write_tokens(tmp_path / "corpus", tokens.numpy())
    sae = _random_sae()
    sae.save_model(tmp_path / "sae")
    (tmp_path / "sae" / "training.json").write_text(json.dumps(
        {"holdout_shards": ["part-00002.parquet", "part-00003.parquet"], "exclude_bos": True}))
    out = evaluate_dictionary({"eval": {"ce_contexts": 10, "dead_min_tokens": 10}}, dictionary=tmp_path / "sae",
                              manifest=m, tokens=tok_path, metrics=tmp_path / "metrics.json", model=model)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["explained_variance"] == pytest.approx(out["explained_variance"])
    held = acts[4:, 1:].reshape(-1, 32)  # contexts 4..7, non-BOS
    x = torch.from_numpy(held)
    with torch.no_grad():
        recon = sae.decode(sae.encode(x)).double()
    xd = x.double()
    ref_ev = 1 - ((xd - recon) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    assert out["n_tokens"] == len(held) and out["n_outliers"] == 0
    assert out["explained_variance"] == pytest.approx(ref_ev.item(), rel=1e-6)
    assert out["ce_contexts"] == 4  # only the held-out contexts
    with torch.no_grad():
        ref = ce_metrics(model, tokens[4:], sae_splice_hooks(sae, HOOK, xd.mean(0).float(), 1))
    assert out["ce_recovered_mean"] == pytest.approx(ref["ce_recovered_mean"], rel=1e-6)
