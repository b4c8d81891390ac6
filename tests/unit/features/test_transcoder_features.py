"""Rule `transcoder_features` on a tiny model with saved per-layer transcoders: every layer's top
contexts and firing counts equal a brute-force encoding of every (context, position > 0) of the
corpus, the records and page are written and valid, and the graph viewer's hover reads them."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mechflow.contracts.documents import load_document
from mechflow.contracts.features import FeatureRecord, TranscoderFeaturesSummary
from mechflow.contracts.parquet import CORPUS_SCHEMA
from mechflow.errors import ConfigError
from mechflow.features.transcoders import transcoder_features
from mechflow.graphs.config import GraphConfig
from mechflow.graphs.replacement import TranscoderSet
from mechflow.graphs.stage import feature_details
from mechflow.testing import make_tiny_llama
from tests.unit.graphs.test_graph_stage import write_set

N_CONTEXTS, T, K = 7, 9, 3


def write_corpus(path: Path, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, vocab, (N_CONTEXTS, T), generator=g)
    ids[:, 0] = 1  # BOS
    table = pa.table({"context_id": pa.array(range(N_CONTEXTS), pa.int64()),
                      "tokens": pa.array(ids.tolist(), pa.list_(pa.int32()))}, schema=CORPUS_SCHEMA)
    pq.write_table(table, path)
    return ids


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transcoder_features")
    model = make_tiny_llama(n_layers=3)
    set_json, folders = write_set(tmp, model)
    tokens = tmp / "tokens.parquet"
    ids = write_corpus(tokens, model.cfg.d_vocab)
    loaded = SimpleNamespace(model=model, tokenizer=SimpleNamespace(decode=lambda i: f"t{i[0]}"))
    out = tmp / "features"
    files = {"top_contexts": out / "top_contexts.parquet", "feature_stats": out / "feature_stats.parquet",
             "features": out / "features.jsonl", "html": out / "features.html", "summary": out / "summary.json"}
    # batch_rows 20 -> 2 contexts per forward pass: several batches, the last one short
    cfg = {"top_contexts": K, "n_features": 6, "window": 2, "batch_rows": 20, "n_logits": 3, "tasks": []}
    result = transcoder_features(cfg, transcoder_set=set_json, tokens=tokens, loaded_model=loaded, **files)
    return model, folders, ids, tokens, files, result


def brute_force(model, folders, ids):
    """Latents of every layer at every (context, position > 0), one forward pass of the whole corpus."""
    tcs = TranscoderSet.from_folders(folders).to(model.cfg.dtype)
    _, cache = model.run_with_cache(ids)
    return {layer: tcs.transcoders[layer].encode(cache[tcs.hook_in(layer)][:, 1:]) for layer in tcs.transcoders}


def test_top_contexts_and_counts_equal_brute_force(analysed):
    model, folders, ids, _, files, result = analysed
    top = pl.read_parquet(files["top_contexts"])
    stats = pl.read_parquet(files["feature_stats"])
    lat = brute_force(model, folders, ids)
    assert result["n_tokens"] == N_CONTEXTS * (T - 1)
    n_live = 0
    for layer, acts in lat.items():
        flat = acts.reshape(-1, acts.shape[-1])                        # rows: context-major, position 1..T-1
        counts = (flat > 0).sum(0)
        got = stats.filter(pl.col("layer") == layer).sort("feature")
        assert got["n_active"].to_list() == counts.tolist()
        assert got["frequency"].to_list() == pytest.approx((counts / flat.shape[0]).tolist())
        assert got["max"].to_list() == pytest.approx(flat.amax(0).clamp(min=0).tolist(), rel=1e-5)
        for f in range(flat.shape[1]):
            rows = top.filter((pl.col("layer") == layer) & (pl.col("feature") == f)).sort("rank")
            firing = flat[:, f][flat[:, f] > 0]
            assert rows.height == min(K, len(firing))
            if not rows.height:
                continue
            n_live += 1
            vals, idx = torch.topk(flat[:, f], rows.height)
            assert rows["activation"].to_list() == pytest.approx(vals.tolist(), rel=1e-5)
            assert rows["context_id"].to_list() == (idx // (T - 1)).tolist()
            assert rows["position"].to_list() == (idx % (T - 1) + 1).tolist()
    assert n_live == sum(p["n_live"] for p in result["per_layer"]) > 0


def test_records_page_and_summary_are_valid(analysed):
    _, _, ids, _, files, result = analysed
    lines = files["features"].read_text().splitlines()
    assert len(lines) == result["n_records"] == sum(p["n_records"] for p in result["per_layer"])
    assert all(p["n_records"] <= 2 for p in result["per_layer"])  # ceil(6 / 3 layers)
    for line in lines:
        rec = FeatureRecord.model_validate(json.loads(line))
        assert rec.hook == f"blocks.{rec.layer}.hook_mlp_out" and rec.logit_effects is not None
        for c in rec.top_contexts:
            assert c.token_id == int(ids[c.context_id, c.position])
    load_document(files["summary"], TranscoderFeaturesSummary, fix="re-run transcoder_features")
    assert "<html" in files["html"].read_text()


def test_the_graph_viewer_reads_the_top_contexts(analysed):
    model, folders, ids, tokens, files, _ = analysed
    top = pl.read_parquet(files["top_contexts"]).sort(["layer", "feature", "rank"])
    layer, f = top.row(0)[:2]
    tcs = TranscoderSet.from_folders(folders)
    details = feature_details(model, tcs, [(layer, f)], tokens, files["top_contexts"],
                              GraphConfig.from_dict({"viewer_top_contexts": 2, "viewer_window": 1}),
                              lambda i: f"t{i}")
    shown = details[f"{layer}_{f}"]["top_contexts"]
    want = top.filter((pl.col("layer") == layer) & (pl.col("feature") == f)).head(2)
    assert [(c["context"], c["position"]) for c in shown] == list(zip(want["context_id"], want["position"]))
    c = shown[0]
    assert c["token"] == f"t{int(ids[c['context'], c['position']])}"
    assert c["left"] == [f"t{int(ids[c['context'], c['position'] - 1])}"]


def test_contexts_of_one_token_are_refused(tmp_path):
    model = make_tiny_llama(n_layers=1)
    set_json, _ = write_set(tmp_path, model)
    tokens = tmp_path / "tokens.parquet"
    pq.write_table(pa.table({"context_id": pa.array([0], pa.int64()), "tokens": pa.array([[1]], pa.list_(pa.int32()))},
                            schema=CORPUS_SCHEMA), tokens)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="corpus.context_size"):
        transcoder_features({}, transcoder_set=set_json, tokens=tokens, top_contexts=out / "t.parquet",
                            feature_stats=out / "s.parquet", features=out / "f.jsonl", html=out / "f.html",
                            summary=out / "s.json", loaded_model=SimpleNamespace(model=model, tokenizer=None))
    assert not out.exists()
