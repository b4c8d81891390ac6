"""End to end on real SmolLM2 activations: shards -> SAELens TopK SAE -> SAELens load -> metrics."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "dictionaries"))
from dictionary_shards import write_shards, write_tokens  # noqa: E402

HOOK = "blocks.15.hook_resid_post"
ROOT = Path(__file__).resolve().parents[2]


def _contexts(loaded, n_ctx: int, T: int) -> torch.Tensor:
    """`n_ctx` contexts of T tokens (BOS + T-1 text tokens) of stdlib docstrings."""
    import collections
    import json as json_mod
    import pathlib

    text = "\n\n".join(inspect.getdoc(m) or "" for m in (collections, json_mod, pathlib, inspect, np, torch.nn.Module))
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= n_ctx * (T - 1)
    bos = loaded.card.bos_token_id
    rows = [[bos] + ids[i * (T - 1):(i + 1) * (T - 1)] for i in range(n_ctx)]
    return torch.tensor(rows)


@pytest.mark.slow
def test_topk_sae_on_smollm2_layer15(smollm2, tmp_path):
    from sae_lens import SAE

    from mechflow.dictionaries import evaluate_dictionary, train_sae

    tokens = _contexts(smollm2, n_ctx=16, T=128)  # 2048 tokens
    with torch.no_grad():
        _, cache = smollm2.model.run_with_cache(tokens, names_filter=HOOK, stop_at_layer=16)
    acts = cache[HOOK].float().numpy()
    manifest = write_shards(tmp_path / "harvest", acts, hook=HOOK, model="smollm2_135m", contexts_per_shard=4,
                            row_group_rows=128, tokens=tokens.numpy())
    tok_path = write_tokens(tmp_path / "corpus", tokens.numpy())

    cfg = yaml.safe_load((ROOT / "config/sae/smoke.yaml").read_text())
    cfg["hook"] = HOOK
    summary = train_sae(cfg, manifest=manifest, out_dir=tmp_path / "sae", model_cfg={"name": "smollm2_135m"})
    assert summary["training_tokens"] >= cfg["training_tokens"]
    sae = SAE.load_from_disk(tmp_path / "sae")
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.metadata.hook_name) == (576, 256, HOOK)

    metrics = evaluate_dictionary(cfg, dictionary=tmp_path / "sae", manifest=manifest, tokens=tok_path,
                                  metrics=tmp_path / "metrics.json", model=smollm2.model)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["n_tokens"] == 4 * 127  # one held-out shard of 4 contexts, BOS excluded
    assert 0 < saved["l0"] <= 8 + 1e-9
    # 16 smoke steps: better than the mean (b_dec starts there); a broken scale fold gives EV << 0
    assert saved["explained_variance"] > 0.0
    assert saved["ce_contexts"] == 4
    assert 0 < saved["ce_clean"] < saved["ce_spliced"] < saved["ce_zero"]
    assert 0 < saved["ce_recovered_zero"] <= 1
    assert metrics["kl_spliced"] > 0
