"""Cross-model statistics stage on the embedded models: linear CKA of SmolLM2 vs Gemma-3 residual streams.

The IOI datasets of both models are prepared from the same task config and seed; their prompt texts
differ (names are kept only when they are one token for the tokenizer), so both models read the
union of the two prompt sets, each with its own tokenization, and CKA compares the last-token
residual streams.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from mechflow.io import atomic_write_json
from mechflow.stats import cross_model, linear_cka
from mechflow.stats.alignment import cka_prompt_texts, representation_cka
from mechflow.stats.stage import cross_model_outputs
from mechflow.tasks import TaskDataset, prepare_task

REPO = Path(__file__).resolve().parents[2]
N_PROMPTS = 12
CFG = {"B": 100, "top_k": 5, "n_permutations": 99}

pytestmark = pytest.mark.slow


def _model_cfg(name: str) -> dict:
    cfg = yaml.safe_load((REPO / "config" / "model" / f"{name}.yaml").read_text())
    return {k: cfg[k] for k in ("name", "dtype", "prepend_bos", "bos_token")}


def _prepare(loaded, folder: Path) -> dict:
    """Task dataset, model card and synthetic node scores (FCAS needs them; CKA is what is tested here)."""
    task = yaml.safe_load((REPO / "config" / "task" / "ioi.yaml").read_text())
    task["n_prompts"] = N_PROMPTS
    prepare_task(task, model_cfg=_model_cfg(loaded.card.name), dataset=folder / "dataset.jsonl",
                 tokenizer=loaded.tokenizer)
    card = loaded.card
    atomic_write_json(folder / "model_card.json", card.model_dump(mode="json"))
    rng = np.random.default_rng(card.n_layers)
    comps = [(f"a{l}.h{h}", "head", l, h) for l in range(card.n_layers) for h in range(card.n_heads)]
    comps += [(f"m{l}", "mlp", l, -1) for l in range(card.n_layers)]
    n = 4
    rows = [(c, kind, l, h, i, float(rng.normal())) for c, kind, l, h in comps for i in range(n)]
    pl.DataFrame(rows, schema={"component": pl.String, "kind": pl.String, "layer": pl.Int32, "head": pl.Int32,
                               "prompt": pl.Int32, "score": pl.Float64}, orient="row") \
        .with_columns(pl.lit("exact").alias("method")).write_parquet(folder / "node_scores.parquet")
    pl.DataFrame({"prompt": np.arange(n, dtype=np.int32), "example_id": [str(i) for i in range(n)],
                  "template": [None] * n, "clean_metric": rng.normal(size=n),
                  "corrupted_metric": rng.normal(size=n)},
                 schema_overrides={"template": pl.String}).write_parquet(folder / "prompts.parquet")
    return {"node_scores": folder / "node_scores.parquet", "prompts": folder / "prompts.parquet",
            "model_card": folder / "model_card.json", "dataset": folder / "dataset.jsonl"}


def _last_token_resid(loaded, ids: list[int], layer: int) -> np.ndarray:
    with torch.no_grad():
        _, cache = loaded.model.run_with_cache(torch.tensor([ids]), names_filter=f"blocks.{layer}.hook_resid_post",
                                               stop_at_layer=layer + 1)
    return cache[f"blocks.{layer}.hook_resid_post"][0, -1].double().numpy()


def test_cka_between_smollm2_and_gemma3(smollm2, gemma3, tmp_path):
    a, b = _prepare(smollm2, tmp_path / "a"), _prepare(gemma3, tmp_path / "b")
    head = cross_model(CFG, node_scores_a=a["node_scores"], node_scores_b=b["node_scores"],
                           model_card_a=a["model_card"], model_card_b=b["model_card"], head_types_a=None,
                           head_types_b=None, prompts_a=a["prompts"], prompts_b=b["prompts"],
                           **cross_model_outputs(tmp_path / "x"),
                           dataset_a=a["dataset"], dataset_b=b["dataset"], model_cfg_a=_model_cfg("smollm2_135m"),
                           model_cfg_b=_model_cfg("gemma3_270m"))
    out = tmp_path / "x"
    assert {"cka.parquet", "cka.png", "cka.json", "fcas.json", "fcas_null.png", "cross_model.md"} <= {
        p.name for p in out.iterdir()}
    df = pl.read_parquet(out / "cka.parquet")
    assert df.height == smollm2.card.n_layers * gemma3.card.n_layers
    assert ((df["cka"] >= 0) & (df["cka"] <= 1 + 1e-9)).all()
    summary = json.loads((out / "cka.json").read_text())
    texts = cka_prompt_texts(a["dataset"], b["dataset"]).texts
    assert summary["n_prompts"] == len(texts) == summary["n_prompts_a"] + summary["n_prompts_b"] - summary["n_shared"]
    assert summary["n_prompts_a"] == summary["n_prompts_b"] == N_PROMPTS and head["cka"]["n_prompts"] == len(texts)

    # one entry against an independent path: one prompt at a time through the model's own to_tokens
    la, lb = 20, 12
    X = np.stack([_last_token_resid(smollm2, smollm2.to_tokens(t)[0].tolist(), la) for t in texts])
    Y = np.stack([_last_token_resid(gemma3, gemma3.to_tokens(t)[0].tolist(), lb) for t in texts])
    # the model's own prompts: to_tokens is the dataset's tokenization
    own = TaskDataset.load(a["dataset"]).examples[0]
    assert smollm2.to_tokens(own.prompt)[0].tolist() == own.clean_ids
    got = df.filter((pl.col("layer_a") == la) & (pl.col("layer_b") == lb))["cka"][0]
    assert got == pytest.approx(linear_cka(X, Y), rel=1e-4)


def test_cka_of_a_model_with_itself_is_one_on_the_diagonal(smollm2, tmp_path):
    a = _prepare(smollm2, tmp_path / "a")
    card = smollm2.card
    texts = cka_prompt_texts(a["dataset"], a["dataset"]).texts
    res = representation_cka(_model_cfg("smollm2_135m"), _model_cfg("smollm2_135m"), card, card,
                             a["dataset"], a["dataset"], texts)
    np.testing.assert_allclose(np.diag(res.matrix), 1.0, atol=1e-9)
    assert (res.matrix <= 1 + 1e-9).all()
