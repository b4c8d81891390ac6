"""Harvest on the tiny llama: stored activations equal a fresh forward pass, at every hook and dtype."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
import yaml
from harvest_testlib import run, write_tokens

from mechflow.errors import ConfigError, DataError
from mechflow.harvest import (
    HarvestConfig,
    expand_hooks,
    iter_activation_batches,
    load_manifest,
    plan_shards,
    stop_layer,
)
from mechflow.io import sha256_file

ROOT = Path(__file__).resolve().parents[3]


def stored(tmp_path: Path, hook: str) -> np.ndarray:
    batches = list(iter_activation_batches(tmp_path / "out" / "shards" / hook, batch_rows=25, as_numpy=True))
    return np.concatenate(batches)


def test_every_hook_point_equals_a_fresh_run_with_cache(tmp_path, tiny_tokens, tiny_llama):
    tokens, ctx = tiny_tokens
    extra = ["hook_embed", "blocks.0.attn.hook_z"]
    run(tmp_path, tokens, tiny_llama, layers=[0, 1],
        hook_points=["resid_pre", "resid_mid", "resid_post", "mlp_in", "mlp_out", "attn_out"], hooks=extra)
    _, cache = tiny_llama.run_with_cache(torch.tensor(ctx))  # full depth, one batch: the reference
    hooks = expand_hooks(HarvestConfig.from_dict({"layers": [0, 1], "hook_points": ["mlp_in"]}), tiny_llama)
    assert hooks == ["blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_normalized"]
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert len(index["hooks"]) == 14
    for entry in index["hooks"]:
        hook = entry["hook"]
        ref = cache[hook].reshape(ctx.size, -1).to(torch.float32).numpy()
        np.testing.assert_allclose(stored(tmp_path, hook), ref, rtol=1e-6, atol=1e-6, err_msg=hook)
        manifest, mpath = load_manifest(tmp_path / "out" / "index.json", hook=hook)
        assert manifest.d == ref.shape[1] and manifest.n_rows == ctx.size
        assert entry["sha256"] == sha256_file(mpath)
    z = load_manifest(tmp_path / "out" / "shards" / "blocks.0.attn.hook_z")[0]
    assert z.d == tiny_llama.cfg.n_heads * tiny_llama.cfg.d_head and z.layer == 0


def test_columns_and_shard_plan(tmp_path, tiny_tokens, tiny_llama):
    tokens, ctx = tiny_tokens
    run(tmp_path, tokens, tiny_llama, layers=[1])  # 36 rows / 12 tokens = 3 contexts per shard
    manifest, _ = load_manifest(tmp_path / "out" / "shards" / "blocks.1.hook_resid_post")
    assert [(s.first_context, s.last_context, s.rows) for s in manifest.shards] == [
        (0, 2, 36), (3, 5, 36), (6, 8, 36), (9, 9, 12)]
    cols = next(iter_activation_batches(tmp_path / "out" / "shards", 1000, ["context_id", "position", "token_id"],
                                        as_numpy=True))
    assert np.array_equal(cols["context_id"], np.repeat(np.arange(10), 12))
    assert np.array_equal(cols["position"], np.tile(np.arange(12), 10))
    assert np.array_equal(cols["token_id"], ctx.reshape(-1))
    assert [(p.first_context, p.stop_context) for p in plan_shards(5, 4, 9)] == [(0, 2), (2, 4), (4, 5)]
    with pytest.raises(ConfigError, match="harvest.shard_rows"):
        plan_shards(5, 4, 3)


def test_stop_layer_is_the_deepest_block_needed():
    assert stop_layer(["blocks.0.hook_resid_post", "blocks.3.ln2.hook_normalized"], 30) == 4
    assert stop_layer(["hook_embed"], 30) == 0
    assert stop_layer(["blocks.1.hook_resid_post", "ln_final.hook_normalized"], 30) is None


@pytest.mark.parametrize("dtype, torch_dtype", [("float32", torch.float32), ("float16", torch.float16),
                                                ("bfloat16", torch.bfloat16)])
def test_dtype_round_trip_is_exact_after_the_cast(tmp_path, tiny_tokens, tiny_llama, dtype, torch_dtype):
    tokens, ctx = tiny_tokens
    run(tmp_path, tokens, tiny_llama, layers=[1], dtype=dtype)
    _, cache = tiny_llama.run_with_cache(torch.tensor(ctx))
    # The stored value is the model's activation rounded once to `dtype` (bf16: round to nearest even).
    ref = cache["blocks.1.hook_resid_post"].reshape(ctx.size, -1).to(torch_dtype).to(torch.float32).numpy()
    assert np.array_equal(stored(tmp_path, "blocks.1.hook_resid_post"), ref)
    assert load_manifest(tmp_path / "out" / "shards")[0].dtype == dtype


def test_bad_hook_name_lists_examples_and_writes_nothing(tmp_path, tiny_tokens, tiny_llama):
    tokens, _ = tiny_tokens
    with pytest.raises(ConfigError, match=r"blocks\.0\.hook_resid_post.*ln2\.hook_normalized"):
        run(tmp_path, tokens, tiny_llama, hooks=["blocks.0.hook_resid_psot"])
    with pytest.raises(ConfigError, match="not per-position"):
        run(tmp_path, tokens, tiny_llama, hooks=["blocks.0.attn.hook_pattern"])
    with pytest.raises(ConfigError, match="harvest.layers"):
        run(tmp_path, tokens, tiny_llama, layers=[2])
    with pytest.raises(ConfigError, match="harvest.hook_points"):
        run(tmp_path, tokens, tiny_llama, hook_points=["resid"])
    assert not (tmp_path / "out").exists()


def test_bad_tokens_are_a_data_error_with_no_output(tmp_path, tiny_llama):
    tokens = tmp_path / "tokens.parquet"
    write_tokens(tokens, d_vocab=80, seed=1)  # ids beyond the tiny model's 50-token vocabulary
    with pytest.raises(DataError, match="outside the vocabulary"):
        run(tmp_path, tokens, tiny_llama)
    tokens.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="tokens.parquet"):
        run(tmp_path, tokens, tiny_llama)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["default", "smoke"])
def test_shipped_configs_match_schema_and_dataclass(name):
    schema = json.loads((ROOT / "workflow/schemas/config/harvest.schema.json").read_text())
    cfg = yaml.safe_load((ROOT / f"config/harvest/{name}.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert set(schema["properties"]) == set(HarvestConfig.__dataclass_fields__)
    HarvestConfig.from_dict(cfg)
