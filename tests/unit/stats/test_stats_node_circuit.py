"""Statistics on a node circuit (files written by the circuit stage's own writer on a tiny model)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from mechflow.attribution.patching import TokenPairs
from mechflow.circuits.config import CircuitConfig
from mechflow.circuits.core import discover_circuit
from mechflow.circuits.result import LogitDiffSpec
from mechflow.circuits.stage import write_circuit_outputs
from mechflow.contracts.models import ModelCard
from mechflow.io import atomic_write_json
from mechflow.stats import stats
from mechflow.stats.stage import stats_outputs
from mechflow.testing import make_tiny_llama


def test_statistics_read_a_node_circuit(tmp_path):
    model = make_tiny_llama(seed=6)
    n, L, H = 6, model.cfg.n_layers, model.cfg.n_heads
    g = torch.Generator().manual_seed(3)
    clean, corrupted = torch.randint(0, 50, (n, 6), generator=g), torch.randint(0, 50, (n, 6), generator=g)
    metric_spec = LogitDiffSpec(correct_ids=[3, 11, 29, 17, 5, 8], incorrect_ids=[7, 2, 41, 30, 44, 9])
    batch = TokenPairs(clean, corrupted, metric_spec.build())
    cfg = CircuitConfig(unit="nodes", ig_steps=2, percentages=(10, 50, 100))
    ids = [f"ex{i}" for i in range(n)]
    doc, scores = discover_circuit(model, batch, cfg, model_cfg={"name": "tiny"}, metric_spec=metric_spec,
                                   prompt_ids=ids)
    assert doc.unit == "nodes"
    d = tmp_path / "circuits"
    d.mkdir()
    files = {k: d / f for k, f in (("circuit", "circuit.json"), ("edge_scores", "edge_scores.parquet"),
                                   ("circuit_prompts", "circuit_prompts.parquet"),
                                   ("curve_prompts", "curve_prompts.parquet"), ("dot", "circuit.dot"),
                                   ("figure", "circuit.png"), ("summary", "circuit.md"))}
    write_circuit_outputs(model, batch, cfg, doc, scores, **files)
    # the attribution stage's tables (synthetic scores; the circuit quantities are what is tested)
    rng = np.random.default_rng(0)
    comps = ([(f"a{l}.h{h}", "head", l, h) for l in range(L) for h in range(H)]
             + [(f"m{l}", "mlp", l, -1) for l in range(L)])
    rows = [{"method": "exact", "component": c, "kind": k, "layer": l, "head": h, "prompt": i, "score": rng.normal()}
            for c, k, l, h in comps for i in range(n)]
    pl.DataFrame(rows).write_parquet(d / "node_scores.parquet")
    pl.DataFrame({"prompt": np.arange(n, dtype=np.int32), "example_id": ids, "template": ["t"] * n,
                  "clean_metric": rng.normal(size=n), "corrupted_metric": rng.normal(size=n)}).write_parquet(
        d / "prompts.parquet")
    card = ModelCard(name="tiny", architecture="LlamaForCausalLM", n_layers=L, n_heads=H, d_model=32,
                     d_mlp=64, d_vocab=50, source="synthetic", dtype="float64", prepend_bos=False)
    atomic_write_json(d / "model_card.json", card.model_dump(mode="json"))
    head = stats({"B": 100, "seed": 1, "top_k": 3, "n_permutations": 19},
                          node_scores=d / "node_scores.parquet", prompts=d / "prompts.parquet",
                          model_card=d / "model_card.json", **stats_outputs(tmp_path / "stats"),
                          circuit=files["circuit"], circuit_prompts=files["circuit_prompts"],
                          curve_prompts=files["curve_prompts"])
    assert head["circuit_unit"] == "nodes"
    assert head["circuit"]["faithfulness"]["estimate"] == pytest.approx(doc.faithfulness, rel=1e-9)
    assert head["circuit"]["cpr"]["estimate"] == pytest.approx(doc.cpr, rel=1e-9, abs=1e-12)
    table = pl.read_parquet(tmp_path / "stats" / "bootstrap.parquet").filter(pl.col("group") == "circuit")
    assert table["reference"].null_count() == 0  # every circuit quantity was checked against circuit.json
    assert "## Node circuit" in (tmp_path / "stats" / "statistics.md").read_text()
