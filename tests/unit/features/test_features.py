"""The `features` stage against exact references: brute-force top contexts, hand matmuls, exact ablation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from dictionary_shards import write_shards, write_tokens

from mechflow.contracts.documents import check_document
from mechflow.contracts.features import FeatureRecord
from mechflow.contracts.parquet import TASK_ATTRIBUTION_SCHEMA, check_schema
from mechflow.dictionaries.data import ShardSource
from mechflow.errors import ConfigError, DataError
from mechflow.features.attribution import SplicedSAE, ablation_effects, feature_attribution
from mechflow.features.logits import effective_decoder, logit_effects
from mechflow.features.records import write_jsonl
from mechflow.features.stage import features
from mechflow.features.stats import stream_feature_stats
from mechflow.io import sha256_file
from mechflow.tasks.dataset import TaskItem, make_batch, write_dataset
from mechflow.testing import make_tiny_sae

HOOK = "blocks.0.hook_resid_post"
BOS = 1
SCRIPT_ID = 7  # the stub tokenizer decodes this id to a <script> tag
REPO = Path(__file__).resolve().parents[3]


class StubTokenizer:
    def decode(self, ids):
        return "".join("<script>alert(1)</script>" if i == SCRIPT_ID else f" t{i}" for i in ids)


def make_sae(d_in=32, d_sae=24, kind="topk", seed=0, dtype="float64"):
    return make_tiny_sae(d_in, d_sae, kind, seed, dtype=dtype)


def save_sae(sae, folder: Path, hook: str = HOOK) -> Path:
    sae.cfg.metadata.hook_name = hook
    sae.save_model(folder)
    (folder / "training.json").write_text(json.dumps({"exclude_bos": True, "hook": hook}))
    return folder


def corpus_tokens(n_ctx=12, T=10, seed=0) -> np.ndarray:
    toks = np.random.default_rng(seed).integers(2, 50, size=(n_ctx, T)).astype(np.int32)
    toks[:, 0] = BOS
    toks[::3, 4] = SCRIPT_ID  # make sure the <script> token shows up in some contexts
    return toks


def harvest(model, tokens: np.ndarray, hook: str = HOOK) -> np.ndarray:
    _, cache = model.run_with_cache(torch.from_numpy(tokens).long(), names_filter=[hook])
    return cache[hook].double().numpy()


def task_items(n=6, T=8, seed=1) -> list[TaskItem]:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        clean = [BOS] + rng.integers(2, 50, T - 1).tolist()
        corrupted = list(clean)
        corrupted[2] = int((clean[2] + 5) % 48 + 2)  # one token differs, as in IOI's ABC corruption
        corrupted[T - 3] = int((clean[T - 3] + 11) % 48 + 2)
        a, w = rng.choice(np.arange(2, 50), 2, replace=False).tolist()
        items.append(TaskItem(id=i, prompt=f"p{i}", corrupted_prompt=f"c{i}", answer=f"a{a}", wrong_answer=f"w{w}",
                              template=None, clean_ids=clean, corrupted_ids=corrupted, answer_id=a, wrong_id=w,
                              good_ids=[a], bad_ids=[w]))
    return items


@pytest.fixture
def run_dir(tmp_path, tiny_llama):
    """A tiny run: corpus, a harvest of the tiny llama at HOOK, an SAE folder and an `ioi` dataset."""
    toks = corpus_tokens()
    tokens = write_tokens(tmp_path / "corpus", toks)
    acts = harvest(tiny_llama, toks)
    manifest = write_shards(tmp_path / "harvest" / HOOK, acts.astype(np.float32), hook=HOOK, tokens=toks,
                            contexts_per_shard=5, row_group_rows=16, corpus_sha256=sha256_file(tokens))
    sae = make_sae()
    dictionary = save_sae(sae, tmp_path / "sae")
    dataset = tmp_path / "tasks" / "ioi" / "dataset.jsonl"
    write_dataset(dataset, task_items(), {"task": "ioi", "kind": "ioi", "metric": "logit_diff"})
    out = tmp_path / "out"
    return {"tokens": tokens, "manifest": manifest, "dictionary": dictionary, "datasets": [dataset], "acts": acts,
            "toks": toks, "sae": sae, "outputs": {"features": out / "features.jsonl", "html": out / "features.html",
                                                   "histograms": out / "histograms.png",
                                                   "attribution": out / "task_attribution.parquet",
                                                   "summary": out / "summary.json"}}


CFG = {"n_features": 6, "top_contexts": 4, "window": 2, "n_logits": 3, "tasks": ["ioi"], "n_prompts": 6,
       "n_verify": 5, "batch_rows": 7, "max_batch": 12}


def run_stage(run_dir, tiny_llama, cfg=CFG, **overrides):
    kwargs = {"dictionary": run_dir["dictionary"], "manifest": run_dir["manifest"], "tokens": run_dir["tokens"],
              "datasets": run_dir["datasets"], "model": tiny_llama, "tokenizer": StubTokenizer(),
              **run_dir["outputs"], **overrides}
    return features(cfg, **kwargs)


# ----------------------------------------------------------------------------- top contexts and stats


def _sparse_relu(x_all: torch.Tensor, d_sae=24, seed=3):
    """Latents that fire rarely (some never, some fewer than k times) plus one constant latent (ties).

    Thresholds are quantiles of each latent's pre-activation over `x_all`, from 0.6 up to 1.0 (never fires).
    """
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(x_all.shape[-1], d_sae, generator=g, dtype=torch.float64) * 0.3
    pre = x_all.double() @ W
    thresh = torch.stack([pre[:, j].quantile(q) for j, q in enumerate(torch.linspace(0.6, 1.0, d_sae).tolist())])

    def encode(x):
        lat = torch.relu(x.double() @ W - thresh)
        lat[:, 0] = 2.0  # every row ties: the earliest rows must win
        return lat

    return encode


@pytest.mark.parametrize("kind", ["topk_sae", "sparse_relu"])
@pytest.mark.parametrize("max_tokens", [None, 50])
def test_top_contexts_equal_brute_force_argmax(run_dir, kind, max_tokens):
    sae = run_dir["sae"]
    acts = torch.from_numpy(run_dir["acts"].astype(np.float32)).double()[:, 1:]  # BOS dropped, as the stage does
    n_ctx, P, _ = acts.shape
    encode = (lambda x: sae.encode(x.double())) if kind == "topk_sae" else _sparse_relu(acts.reshape(n_ctx * P, -1))
    k, d_sae = 5, 24
    stats = stream_feature_stats(encode, ShardSource([run_dir["manifest"]]), d_sae=d_sae, k=k, batch_rows=7,
                                 max_tokens=max_tokens, progress=False)
    lat = encode(acts.reshape(-1, acts.shape[-1])).detach()
    ctx = torch.arange(n_ctx).repeat_interleave(P)
    pos = torch.arange(1, P + 1).repeat(n_ctx)
    if max_tokens:
        lat, ctx, pos = lat[:max_tokens], ctx[:max_tokens], pos[:max_tokens]
    assert stats.n_tokens == len(lat)
    fired = (lat != 0).sum(0)
    if kind == "sparse_relu":
        assert (fired == 0).any() and ((fired > 0) & (fired < k)).any()  # both edge cases occur
    for f in range(d_sae):
        col = lat[:, f]
        order = torch.argsort(col, descending=True, stable=True)[:k]
        ref = [(float(col[i]), int(ctx[i]), int(pos[i])) for i in order if col[i] > 0]
        got = stats.top_contexts(f)
        assert [(c, p) for _, c, p in got] == [(c, p) for _, c, p in ref], f
        np.testing.assert_allclose([v for v, _, _ in got], [v for v, _, _ in ref], rtol=1e-9, atol=1e-12)
        assert int(stats.count[f]) == int(fired[f])
        active = col[col != 0]
        assert int(stats.hist[f].sum()) == len(active)
        if len(active):
            s = stats.feature_stats(f)
            assert float(stats.max[f]) == pytest.approx(float(col.max()), rel=1e-12)
            assert s["mean_active"] == pytest.approx(float(active.mean()), rel=1e-10)
            assert s["std_active"] == pytest.approx(float(active.std(unbiased=False)), rel=1e-6, abs=1e-9)
            assert s["frequency"] == pytest.approx(len(active) / len(lat))
            ref_bins = torch.bincount(torch.floor((active.log10() + 4) * 10).clamp(0, 79).long(), minlength=80)
            assert stats.hist[f].tolist() == ref_bins.tolist()


# ----------------------------------------------------------------------------- logit effects


def test_logit_effects_equal_hand_matmul(tiny_llama):
    model = tiny_llama
    sae = make_sae(kind="standard")
    W = effective_decoder(sae)
    torch.testing.assert_close(W, sae.W_dec.detach(), rtol=0, atol=1e-12)  # standard SAE: decode(e_i) - decode(0)
    assert model.ln_final.w is not None  # unfolded RMSNorm: its weight must be applied by hand
    feats = [0, 5, 11]
    got = logit_effects(model, W.to(model.cfg.dtype), feats, n=4)
    hand = (sae.W_dec.detach().double() * model.ln_final.w.detach()) @ model.W_U.detach()
    for f in feats:
        top = torch.topk(hand[f], 4)
        bottom = torch.topk(-hand[f], 4)
        assert [t for t, _ in got[f]["promoted"]] == top.indices.tolist()
        assert [t for t, _ in got[f]["suppressed"]] == bottom.indices.tolist()
        np.testing.assert_allclose([v for _, v in got[f]["promoted"]], top.values.tolist(), rtol=1e-12)
        np.testing.assert_allclose([v for _, v in got[f]["suppressed"]], (-bottom.values).tolist(), rtol=1e-12)


def test_effective_decoder_includes_decoder_norm_rescaling():
    from sae_lens import TopKSAE, TopKSAEConfig

    sae = TopKSAE(TopKSAEConfig(d_in=8, d_sae=12, k=3, dtype="float64", rescale_acts_by_decoder_norm=True))
    with torch.no_grad():
        sae.W_dec.normal_(0, 2.0)
    W = effective_decoder(sae)
    torch.testing.assert_close(W, sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- attribution and ablation


def _batch():
    return make_batch(task_items(), "logit_diff")


@pytest.mark.parametrize("error_term", [True, False])
@pytest.mark.parametrize("ablation", ["corrupted", "zero"])
def test_attribution_equals_exact_ablation_where_the_metric_is_linear(tiny_llama, error_term, ablation):
    # After the final norm's division the logit difference is linear in the hook, so the
    # first-order attribution of every latent (and of any set: additivity) is exact.
    sae = make_sae()
    spliced = SplicedSAE.build(tiny_llama, sae, "ln_final.hook_normalized", start=1, error_term=error_term)
    batch = _batch()
    fa = feature_attribution(spliced, batch, ablation)
    feats = [int(i) for i in torch.argsort(fa.mean.abs(), descending=True)[:8]]
    assert float(fa.mean[feats[0]].abs()) > 1e-3  # the test would be vacuous otherwise
    exact = ablation_effects(spliced, batch, fa, [[f] for f in feats] + [feats], max_batch=12)
    torch.testing.assert_close(exact[:-1], fa.per_prompt[:, feats].T, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(exact[-1], fa.per_prompt[:, feats].sum(1), rtol=1e-9, atol=1e-10)
    if error_term:  # the spliced model with its error term is the model itself
        torch.testing.assert_close(fa.m_spliced, fa.m_model, rtol=0, atol=1e-12)
    else:
        assert not torch.allclose(fa.m_spliced, fa.m_model)


def test_attribution_matches_finite_differences_at_a_nonlinear_hook(tiny_llama):
    sae = make_sae()
    spliced = SplicedSAE.build(tiny_llama, sae, HOOK, start=1)
    batch = _batch()
    fa = feature_attribution(spliced, batch, "corrupted")
    feats = [int(i) for i in torch.argsort(fa.mean.abs(), descending=True)[:5]]
    eps = 1e-5
    plus = ablation_effects(spliced, batch, fa, [[f] for f in feats], alpha=eps)
    minus = ablation_effects(spliced, batch, fa, [[f] for f in feats], alpha=-eps)
    fd = (plus - minus) / (2 * eps)
    torch.testing.assert_close(fd, fa.per_prompt[:, feats].T, rtol=1e-6, atol=1e-8)
    # and the full patch is not linear here: attribution is only an estimate
    full = ablation_effects(spliced, batch, fa, [[f] for f in feats])
    assert not torch.allclose(full, fa.per_prompt[:, feats].T, rtol=1e-3)


@pytest.mark.parametrize("error_term", [True, False])
def test_ablation_verification_is_exact(tiny_llama, error_term):
    """ablation_effects equals an independent TransformerLens-hook rerun with the latent patched."""
    model = tiny_llama
    sae = make_sae()
    spliced = SplicedSAE.build(model, sae, HOOK, start=1, error_term=error_term)
    batch = _batch()
    fa = feature_attribution(spliced, batch, "corrupted")
    feats = [3, 9, 17]
    got = ablation_effects(spliced, batch, fa, [[f] for f in feats] + [feats], max_batch=6)  # 1 set per forward
    _, cache_c = model.run_with_cache(batch.corrupted_tokens, names_filter=[HOOK])
    with torch.no_grad():
        lat_corr = sae.encode(cache_c[HOOK][:, 1:])

    def edited(patch):
        def hook(act, hook=None):
            act = act.clone()
            lat = sae.encode(act[:, 1:])
            x_hat = sae.decode(lat)
            lat2 = lat.clone()
            lat2[..., patch] = lat_corr[..., patch]
            new = sae.decode(lat2)
            act[:, 1:] = new + (act[:, 1:] - x_hat) if error_term else new
            return act
        return hook

    with torch.no_grad():
        base = batch.metric(model.run_with_hooks(batch.clean_tokens, fwd_hooks=[(HOOK, edited([]))]))
        for row, patch in enumerate([[f] for f in feats] + [feats]):
            m = batch.metric(model.run_with_hooks(batch.clean_tokens, fwd_hooks=[(HOOK, edited(patch))]))
            torch.testing.assert_close(got[row], base - m, rtol=1e-9, atol=1e-10)
    assert got.abs().max() > 1e-4


# ----------------------------------------------------------------------------- the stage


def test_stage_writes_records_html_histograms_and_attribution(run_dir, tiny_llama):
    result = run_stage(run_dir, tiny_llama)
    out = run_dir["outputs"]
    records = [check_document(FeatureRecord, json.loads(line)) for line in out["features"].read_text().splitlines()]
    assert len(records) == result["n_records"] >= 6
    toks = run_dir["toks"]
    task = result["tasks"][0]
    verified = task["joint"]["features"]
    assert set(verified) <= {r["feature"] for r in records}  # the attributed latents are always recorded
    for rec in records:
        assert rec["hook"] == HOOK and rec["layer"] == 0
        assert rec["stats"]["n_active"] > 0 or rec["feature"] in verified
        assert len(rec["logit_effects"]["promoted"]) == 3
        assert set(rec["task_attribution"]) == {"ioi"}
        for c in rec["top_contexts"]:
            row = toks[c["context_id"]].tolist()
            p = c["position"]
            assert c["token_id"] == row[p] and p >= 1
            assert c["left_ids"] == row[max(0, p - 2):p] and c["right_ids"] == row[p + 1:p + 3]
            assert c["token"] == StubTokenizer().decode([row[p]])
    frame = pl.read_parquet(out["attribution"])
    check_schema(frame.to_arrow().schema, TASK_ATTRIBUTION_SCHEMA, "task_attribution.parquet")
    assert frame.height == run_dir["sae"].cfg.d_sae and frame["verified"].sum() == len(verified)
    ver = frame.filter(pl.col("verified")).sort("rank")
    assert ver["feature"].to_list() == verified
    exact = dict(zip(ver["feature"].to_list(), ver["exact_effect"].to_list()))
    for row in task["top"]:
        assert row["exact_effect"] == pytest.approx(exact[row["feature"]])
    assert task["agreement"]["n"] == len(verified) and task["m_spliced"] == pytest.approx(task["m_model"])
    assert out["histograms"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = out["html"].read_text()
    assert "data:image/png;base64," in page and "<script" not in page  # self-contained, escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    summary = json.loads(out["summary"].read_text())
    assert summary["n_tokens"] == 12 * 9 and summary["ioi_sign_agreement"] == task["agreement"]["sign_agreement"]
    assert not [p for p in out["features"].parent.iterdir() if p.name.endswith(".tmp")]


def test_jsonl_is_written_atomically(tmp_path):
    path = tmp_path / "features.jsonl"
    path.write_text("old\n")
    with pytest.raises(TypeError):
        write_jsonl([{"feature": 0}, {"feature": object()}], path)  # fails after the first line
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["features.jsonl"]


# ----------------------------------------------------------------------------- bad inputs


def test_missing_sae_folder_is_a_clear_error(run_dir, tiny_llama, tmp_path):
    with pytest.raises(DataError, match=r"SAE folder .*nowhere does not exist.*train_sae"):
        run_stage(run_dir, tiny_llama, dictionary=tmp_path / "nowhere")


def test_d_model_mismatch_is_a_clear_error(run_dir, tiny_llama, tmp_path):
    narrow = save_sae(make_sae(d_in=16), tmp_path / "narrow")
    with pytest.raises(ConfigError, match=r"d_in=16 but harvest .* holds d=32"):
        run_stage(run_dir, tiny_llama, dictionary=narrow)
    spliced = SplicedSAE.build(tiny_llama, make_sae(d_in=16), HOOK, start=1)
    with pytest.raises(ConfigError, match=r"d_in=16 but hook .* has width 32"):
        spliced.latents(torch.ones(2, 5, dtype=torch.long))


def test_unknown_task_is_a_clear_error(run_dir, tiny_llama):
    cfg = {**CFG, "tasks": ["ioi", "nope"]}
    with pytest.raises(ConfigError, match=r"features\.tasks: \['nope'\] are not tasks of this run"):
        run_stage(run_dir, tiny_llama, cfg=cfg)


def test_corpus_that_does_not_match_the_harvest_is_a_clear_error(run_dir, tiny_llama, tmp_path):
    other = write_tokens(tmp_path / "other", corpus_tokens(seed=5))
    with pytest.raises(DataError, match=r"is not the corpus harvest .* ran on"):
        run_stage(run_dir, tiny_llama, tokens=other)


def test_unknown_hook_is_a_clear_error(tiny_llama):
    with pytest.raises(ConfigError, match=r"not a hook of the model"):
        SplicedSAE.build(tiny_llama, make_sae(), "blocks.9.hook_resid_post", start=1)


# ----------------------------------------------------------------------------- the DAG


def test_dry_run_plans_features_once_per_run(tmp_path):
    targets = [f"results/{run}/features/features.jsonl" for run in ("smollm2_135m", "gemma3_270m")]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                             "--directory", str(tmp_path), "-n", "--cores", "2", *targets, "--config",
                             "overrides=model=smollm2_135m,gemma3_270m"],
                            check=False, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = {p[0]: int(p[1]) for p in (line.split() for line in result.stdout.splitlines())
              if len(p) == 2 and p[1].isdigit()}
    assert counts["features"] == 2 and counts["train_sae"] == 2
    assert "results/smollm2_135m/tasks/ioi/dataset.jsonl" in result.stdout
