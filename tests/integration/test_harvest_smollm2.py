"""Corpus + harvest on the real SmolLM2: stored activations equal a fresh run_with_cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mechflow.corpus import prepare_corpus, read_contexts, stdlib_docs
from mechflow.harvest import harvest, iter_activation_batches, verify_shards

ROOT = Path(__file__).resolve().parents[2]
MODEL_CFG = yaml.safe_load((ROOT / "config/model/smollm2_135m.yaml").read_text())  # as the smollm2 fixture


@pytest.mark.slow
def test_harvest_matches_run_with_cache_and_mlp_pair(tmp_path, smollm2):
    corpus_cfg = yaml.safe_load((ROOT / "config/corpus/smoke.yaml").read_text())
    prepare_corpus(corpus_cfg, model_cfg=MODEL_CFG, tokens=tmp_path / "tokens.parquet",
                   corpus_manifest=tmp_path / "corpus.json")
    ctx = read_contexts(tmp_path / "tokens.parquet")
    # The tokenizer-only path agrees with the loaded model's own BOS convention.
    first = smollm2.to_tokens(next(iter(stdlib_docs())))[0, : ctx.shape[1]].numpy()
    assert np.array_equal(ctx[0, : len(first)], first)

    cfg = yaml.safe_load((ROOT / "config/harvest/smoke.yaml").read_text())  # layer 3: resid_post, mlp_in, mlp_out
    out = harvest(cfg, model_cfg=MODEL_CFG, tokens=tmp_path / "tokens.parquet", index=tmp_path / "index.json",
                  harvest_dir=tmp_path / "shards", loaded_model=smollm2)
    n = cfg["max_contexts"]
    assert out["n_contexts"] == n
    index = json.loads((tmp_path / "index.json").read_text())
    assert [h["hook"] for h in index["hooks"]] == ["blocks.3.hook_resid_post", "blocks.3.ln2.hook_normalized",
                                                   "blocks.3.hook_mlp_out"]

    stored = {}
    for entry in index["hooks"]:
        manifest = verify_shards(tmp_path / "shards" / entry["hook"])
        assert manifest.model_sha256 == smollm2.card.source_sha256 and manifest.d == 576
        batches = iter_activation_batches(tmp_path / "index.json", 64, hook=entry["hook"], as_numpy=True)
        stored[entry["hook"]] = np.concatenate(list(batches))
    tokens = torch.tensor(ctx[:n])
    with torch.inference_mode():
        _, cache = smollm2.model.run_with_cache(tokens)  # the full model, no stop_at_layer
        for hook, values in stored.items():
            ref = cache[hook].reshape(-1, 576).numpy()
            np.testing.assert_allclose(values, ref, rtol=1e-4, atol=1e-5, err_msg=hook)
        # mlp_in is exactly what the MLP reads: MLP(mlp_in) reproduces mlp_out.
        mlp_in = torch.from_numpy(stored["blocks.3.ln2.hook_normalized"]).reshape(n, -1, 576)
        recomputed = smollm2.model.blocks[3].mlp(mlp_in).reshape(-1, 576).numpy()
    np.testing.assert_allclose(recomputed, stored["blocks.3.hook_mlp_out"], rtol=1e-4, atol=1e-4)
