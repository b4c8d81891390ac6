"""Dictionary metrics against brute force (EV, outliers, dead/dense) and explicit-hook CE/KL."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dictionary_shards import write_shards, write_tokens

from mechflow.dictionaries.config import SAEConfig
from mechflow.dictionaries.data import ShardSource
from mechflow.dictionaries.evaluate import evaluate_dictionary, evaluate_sae
from mechflow.dictionaries.metrics import ce_metrics, reconstruction_metrics, sae_splice_hooks

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
    # the rule's stage: the whole `sae` group, typed; the same numbers from its `eval` block
    group = SAEConfig.from_dict({"hook": HOOK, "eval": {"ce_contexts": 10, "dead_min_tokens": 10}})
    staged = evaluate_sae(group, dictionary=tmp_path / "sae", manifest=m, tokens=tok_path,
                          metrics=tmp_path / "sae_metrics.json", model=model)
    assert staged == out


@pytest.mark.parametrize("kind", ["clt", "per_layer"])
def test_evaluate_transcoder_splices_every_layer_of_a_stack(tiny_llama, tmp_path, kind):
    """CE with a 2-layer stack spliced in equals a pass-by-pass reference: layer 0's input is
    clean, so its output is fixed first; layer 1 then reads the input that output produces."""
    from mechflow.dictionaries.evaluate import evaluate_transcoder
    from mechflow.dictionaries.transcoder import TRANSCODER_INDEX, JumpReLUTranscoderStack, save_stack
    from mechflow.io import atomic_write_json

    model = tiny_llama
    ins = [f"blocks.{l}.ln2.hook_normalized" for l in (0, 1)]
    outs = [f"blocks.{l}.hook_mlp_out" for l in (0, 1)]
    tokens = torch.randint(0, 50, (8, 10), generator=torch.Generator().manual_seed(4))
    tokens[:, 0] = 1
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in ins + outs)
    manifests = [write_shards(tmp_path / h, cache[h].float().numpy(), hook=h, contexts_per_shard=2,
                              tokens=tokens.numpy()) for h in ins + outs]
    tok_path = write_tokens(tmp_path / "corpus", tokens.numpy())
    stack = JumpReLUTranscoderStack(2, 32, 32, 24, kind, init_threshold=0.02, seed=1)
    with torch.no_grad():
        stack.b_enc.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    folder = tmp_path / "tc"
    index = save_stack(stack, folder, layers=[0, 1], in_hooks=ins, out_hooks=outs, metadata={})
    atomic_write_json(folder / TRANSCODER_INDEX, index)
    holdout = ["part-00002.parquet", "part-00003.parquet"]  # contexts 4..7
    atomic_write_json(folder / "training.json", {"holdout_shards": holdout, "exclude_bos": True})
    cfg = {"kind": kind, "layers": [0, 1], "d_sae": 24, "eval": {"ce_contexts": 10, "dead_min_tokens": 10}}
    out = evaluate_transcoder(cfg, dictionary=folder, manifests=manifests, tokens=tok_path,
                              metrics=tmp_path / "m.json", model=model)
    assert json.loads((tmp_path / "m.json").read_text())["fvu"] == pytest.approx(out["fvu"])

    held = tokens[4:]
    x = torch.stack([cache[h][4:, 1:].reshape(-1, 32) for h in ins], 1).float()
    y = torch.stack([cache[h][4:, 1:].reshape(-1, 32) for h in outs], 1).double()
    with torch.no_grad():
        y_hat = stack(x).double()
    fvu = ((y - y_hat) ** 2).sum((0, 2)) / ((y - y.mean(0)) ** 2).sum((0, 2))
    assert out["fvu_per_layer"] == pytest.approx(fvu.tolist(), rel=1e-5)
    assert out["ce_contexts"] == 4

    def replace(name, values):
        def fn(act, hook=None):
            act = act.clone()
            act[:, 1:] = values.to(act.dtype)
            return act
        return (name, fn)

    with torch.no_grad():
        _, c0 = model.run_with_cache(held, names_filter=ins[0])
        x0 = c0[ins[0]][:, 1:].float()
        first = stack(torch.stack([x0, x0], 2).reshape(-1, 2, 32))[:, 0].reshape(x0.shape)
        with model.hooks(fwd_hooks=[replace(outs[0], first)]):
            _, c1 = model.run_with_cache(held, names_filter=ins[1])
        x1 = c1[ins[1]][:, 1:].float()
        second = stack(torch.stack([x0, x1], 2).reshape(-1, 2, 32))[:, 1].reshape(x1.shape)
        clean = model(held).double()
        spliced = model.run_with_hooks(held, fwd_hooks=[replace(outs[0], first), replace(outs[1], second)]).double()
    ce_clean = -F.log_softmax(clean[:, :-1], -1).gather(-1, held[:, 1:, None]).mean()
    ce_sp = -F.log_softmax(spliced[:, :-1], -1).gather(-1, held[:, 1:, None]).mean()
    assert out["ce_clean"] == pytest.approx(ce_clean.item(), rel=1e-9)
    assert out["ce_spliced"] == pytest.approx(ce_sp.item(), rel=1e-5)
    assert out["ce_spliced"] != pytest.approx(out["ce_clean"], rel=1e-4)
    assert out["l0"] == pytest.approx(sum(out["l0_per_layer"])) and out["l0"] > 0
    with pytest.raises(Exception, match="transcoder.kind/layers"):
        evaluate_transcoder({**cfg, "layers": [0]}, dictionary=folder, manifests=manifests, tokens=tok_path,
                            metrics=tmp_path / "bad.json", model=model)
    assert not (tmp_path / "bad.json").exists()
