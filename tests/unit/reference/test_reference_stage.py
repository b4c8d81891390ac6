"""The reference stage on tiny random models: exact single-edge effects against a direct
`graph_forward` evaluation, AUCs recomputed independently, circuit-score reuse, caching, and the
refusal path of a Gemma-like model (post-norms: no additive head senders)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from mechflow.attribution.gradients import (
    attribution_patching,
    integrated_gradients_patching,
)
from mechflow.attribution.patching import exact_patching
from mechflow.attribution.stage import long_rows
from mechflow.benchmark.core import load_task_batch
from mechflow.circuits.config import CircuitConfig
from mechflow.circuits.core import discover_circuit
from mechflow.circuits.eap import edge_scores
from mechflow.circuits.forward import graph_forward
from mechflow.circuits.graph import EdgeGraph
from mechflow.circuits.result import TargetMetricSpec, write_circuit
from mechflow.circuits.stage import _edge_table
from mechflow.errors import DataError
from mechflow.reference import (
    edge_reference,
    read_edge_reference,
    reference,
    roc_auc,
)
from mechflow.reference.auc import positives
from mechflow.reference.sampling import receiver_layers
from mechflow.testing import write_tiny_task_dataset

CFG = {"n_prompts": 4, "restriction": {"last_layers": 1}, "n_sampled_edges": 30, "min_per_layer": 3, "seed": 0,
       "max_batch_rows": 8, "ig_steps": 3, "positives": {"top_fraction": 0.2, "threshold": 0.05}}
MODEL_CFG = {"name": "tiny", "edge_circuits": True}


def write_task(path, model_name: str, n: int = 5, pos: int = 6):
    return write_tiny_task_dataset(path, model_name, n, pos)


def write_node_tables(model, batch, folder):
    """The attribute rule's node_scores.parquet / prompts.parquet, from the real methods."""
    rows = [long_rows("exact", exact_patching(model, batch, "head", per_prompt=True),
                       exact_patching(model, batch, "mlp", per_prompt=True)),
            long_rows("ap", attribution_patching(model, batch, "head", per_prompt=True),
                       attribution_patching(model, batch, "mlp", per_prompt=True)),
            long_rows("ig", integrated_gradients_patching(model, batch, "head", steps=3, per_prompt=True),
                       integrated_gradients_patching(model, batch, "mlp", steps=3, per_prompt=True))]
    pl.concat(rows).write_parquet(folder / "node_scores.parquet")
    with torch.no_grad():
        pl.DataFrame({"prompt": list(range(len(batch))), "example_id": [str(i) for i in batch.example_ids],
                      "clean_metric": batch.metric(model(batch.clean_tokens)).double().tolist(),
                      "corrupted_metric": batch.metric(model(batch.corrupted_tokens)).double().tolist()}
                     ).write_parquet(folder / "prompts.parquet")


def stage_inputs(env) -> dict:
    return {"model_cfg": MODEL_CFG, "dataset": env.data, "node_scores": env.root / "node_scores.parquet",
            "node_prompts": env.root / "prompts.parquet", "edge_reference": env.root / "edge_reference.parquet",
            "task": "t", "model": env.loaded}


def outputs(folder):
    return {"auc": folder / "auc.json", "roc": folder / "roc.png", "summary": folder / "reference.md"}


@pytest.fixture(scope="module")
def env(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    loaded = SimpleNamespace(model=tiny_llama, card=SimpleNamespace(name="tiny"))
    data = write_task(root / "dataset.jsonl", "tiny")
    _, _, batch = load_task_batch(MODEL_CFG, data, CFG["n_prompts"], loaded)
    write_node_tables(tiny_llama, batch, root)
    edge_reference(CFG, model_cfg=MODEL_CFG, dataset=data, edge_reference=root / "edge_reference.parquet",
                       task="t", model=loaded)
    out = root / "computed"
    reference(CFG, model_cfg=MODEL_CFG, dataset=data, node_scores=root / "node_scores.parquet",
                  node_prompts=root / "prompts.parquet", edge_reference=root / "edge_reference.parquet",
                  task="t", model=loaded, **outputs(out))
    return SimpleNamespace(root=root, loaded=loaded, data=data, batch=batch, out=out,
                           doc=json.loads((out / "auc.json").read_text()))


def test_exact_effects_equal_direct_single_edge_graph_forward(tiny_llama, env):
    table, doc = read_edge_reference(env.root / "edge_reference.parquet")
    frame = pl.from_arrow(table)
    g = EdgeGraph.from_cfg(tiny_llama.cfg)
    batch = env.batch
    with torch.no_grad():
        corrupted = graph_forward(tiny_llama, batch.corrupted_tokens, g, record=True)[1]
        m_full = float(batch.metric(graph_forward(tiny_llama, batch.clean_tokens, g)[0]).mean())
        m_empty = float(batch.metric(tiny_llama(batch.corrupted_tokens)).mean())
    assert doc["m_full"] == pytest.approx(m_full, abs=1e-10) and doc["m_empty"] == pytest.approx(m_empty, abs=1e-10)
    # one edge per receiver layer (0, 1, logits), sampled and restricted, plus a few more
    picks = [frame.filter(pl.col("receiver_layer") == L).row(0, named=True) for L in range(3)]
    picks += frame.filter(pl.col("restricted")).sample(3, seed=1).to_dicts()
    effects = []
    for row in picks:
        removed = torch.zeros_like(g.valid)
        removed[g.edge_index(row["edge"])] = True
        with torch.no_grad():
            logits = graph_forward(tiny_llama, batch.clean_tokens, g, corrupted=corrupted, removed=removed)[0]
        direct = float(batch.metric(logits).mean()) - m_full
        assert row["exact_effect"] == pytest.approx(direct, rel=1e-9, abs=1e-12), row["edge"]
        effects.append(abs(direct))
    assert max(effects) > 1e-3  # the comparison is not between zeros


def test_edge_table_holds_the_restricted_graph_and_a_stratified_sample(tiny_llama, env):
    table, doc = read_edge_reference(env.root / "edge_reference.parquet")
    frame = pl.from_arrow(table)
    g = EdgeGraph.from_cfg(tiny_llama.cfg)
    restricted = set(frame.filter(pl.col("restricted"))["edge"])
    expected = {g.edge_name(s, r) for s, r in g.valid.nonzero().tolist() if receiver_layers(g)[r] >= 1}
    # q/k/v, m1, logits
    assert restricted == expected and doc["n_edges_restricted"] == len(expected) == 12 * 6 + 10 + 11
    sampled = frame.filter(pl.col("sampled"))
    assert sampled.height == 30 == doc["n_edges_sampled"]
    assert sorted(set(sampled["receiver_layer"])) == [0, 1, 2]  # every receiver layer, logits = 2
    assert frame["exact_effect"].is_finite().all() and frame["edge"].n_unique() == frame.height
    assert frame["config_hash"].n_unique() == 1 and frame["prompts_hash"].n_unique() == 1
    assert doc["prompt_ids"] == ["e0", "e1", "e2", "e3"] and "stratified" in doc["sampling"]["rule"]


def test_stage_writes_every_output_and_its_aucs_recompute(tiny_llama, env):
    for path in outputs(env.out).values():
        assert path.stat().st_size > 0
    doc = env.doc
    assert set(doc["nodes"]["methods"]) == {"ap", "ig"} and doc["nodes"]["n_components"] == 2 * 5
    assert doc["edges"]["skipped"] is None and "computed here" in doc["edges"]["scores_source"]["eap-ig"]
    assert "Methods vs exact patching" in (env.out / "reference.md").read_text()
    # independent recomputation of one edge AUC from the Parquet and a fresh EAP run
    frame = pl.from_arrow(read_edge_reference(env.root / "edge_reference.parquet")[0]).filter(pl.col("restricted"))
    g = EdgeGraph.from_cfg(tiny_llama.cfg)
    eap = edge_scores(tiny_llama, env.batch, "eap", graph=g)
    score = np.array([abs(float(eap[g.edge_index(e)])) for e in frame["edge"]])
    exact = frame["exact_effect"].to_numpy()
    ref = doc["edges"]["edge_reference"]
    pos = positives(exact, 0.2, 0.05, ref["m_full"] - ref["m_empty"])
    got = doc["edges"]["sets"]["restricted"]["methods"]["eap"]["roc_auc"]
    for variant in ("top_k", "threshold"):
        assert got[variant] == pytest.approx(roc_auc(score, pos[variant]["labels"]), abs=1e-12)
    assert doc["edges"]["sets"]["restricted"]["positives"]["top_k"]["k"] == int(np.ceil(0.2 * len(exact)))


def test_circuit_scores_are_reused_on_the_same_prompts_only(tiny_llama, env, tmp_path):
    spec = TargetMetricSpec.from_task_batch(env.batch)
    ids = [str(i) for i in env.batch.example_ids]

    def circuit_files(folder, steps):
        ccfg = CircuitConfig(ig_steps=steps, percentages=(10, 100))
        doc, scores = discover_circuit(tiny_llama, env.batch, ccfg, model_cfg=MODEL_CFG, metric_spec=spec,
                                       prompt_ids=ids)
        g = EdgeGraph.from_cfg(tiny_llama.cfg)
        order = torch.sort(-scores.flatten().abs(), stable=True).indices
        order = order[g.valid.flatten()[order]]
        write_circuit(folder / "circuit.json", doc)
        _edge_table(scores, g, order, doc.n_edges).write_parquet(folder / "edge_scores.parquet")
        return {"circuit": folder / "circuit.json", "edge_scores": folder / "edge_scores.parquet"}

    common = stage_inputs(env)
    same = tmp_path / "same"
    same.mkdir()
    reference(CFG, **common, **circuit_files(same, 3), **outputs(same / "out"))
    doc = json.loads((same / "out" / "auc.json").read_text())
    assert doc["edges"]["scores_source"]["eap-ig"].startswith("reused")
    for name in ("restricted", "sampled"):  # reused scores = the ones computed here
        for key in ("roc_auc", "pearson", "spearman"):
            a = doc["edges"]["sets"][name]["methods"]["eap-ig"][key]
            b = env.doc["edges"]["sets"][name]["methods"]["eap-ig"][key]
            assert a == pytest.approx(b, abs=1e-9)
    other = tmp_path / "other"
    other.mkdir()
    reference(CFG, **common, **circuit_files(other, 2), **outputs(other / "out"))
    src = json.loads((other / "out" / "auc.json").read_text())["edges"]["scores_source"]["eap-ig"]
    assert src.startswith("computed") and "ig_steps=2" in src


def test_method_settings_rerun_without_the_exact_part_which_is_checked(env, tmp_path):
    common = stage_inputs(env)
    before = (env.root / "edge_reference.parquet").stat().st_mtime_ns
    reference({**CFG, "positives": {"top_fraction": 0.5, "threshold": 0.2}}, **common, **outputs(tmp_path / "a"))
    doc = json.loads((tmp_path / "a" / "auc.json").read_text())
    assert doc["edges"]["sets"]["sampled"]["positives"]["top_k"]["k"] == 15
    assert (env.root / "edge_reference.parquet").stat().st_mtime_ns == before
    with pytest.raises(DataError, match="re-run rule edge_reference"):
        reference({**CFG, "seed": 1}, **common, **outputs(tmp_path / "b"))
    assert not (tmp_path / "b" / "auc.json").exists()


def tiny_gemma():
    """A random Gemma-3-like model: norms after attention and MLP (edges undefined, nodes fine)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, d_head=8, n_heads=4, n_key_value_heads=2, d_mlp=64, d_vocab=50, n_ctx=64,
        act_fn="gelu_pytorch_tanh", normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8,
        gated_mlp=True, final_rms=True, original_architecture="Gemma3ForCausalLM",
        use_normalization_before_and_after=True, seed=0, dtype=torch.float64, default_prepend_bos=False)
    return HookedTransformer(cfg, move_to_device=False).eval()


def test_gemma_like_model_skips_edges_with_the_reason_and_keeps_nodes(tmp_path):
    model = tiny_gemma()
    loaded = SimpleNamespace(model=model, card=SimpleNamespace(name="tinygemma"))
    data = write_task(tmp_path / "dataset.jsonl", "tinygemma")
    _, _, batch = load_task_batch({}, data, 4, loaded)
    write_node_tables(model, batch, tmp_path)
    model_cfg = {"name": "tinygemma", "edge_circuits": True}  # the model check itself refuses
    edge_reference(CFG, model_cfg=model_cfg, dataset=data, edge_reference=tmp_path / "edge_reference.parquet",
                       model=loaded)
    table = pq.read_table(tmp_path / "edge_reference.parquet")
    _, doc = read_edge_reference(tmp_path / "edge_reference.parquet")
    assert table.num_rows == 0 and "post-norms" in doc["skipped"]
    reference(CFG, model_cfg=model_cfg, dataset=data, node_scores=tmp_path / "node_scores.parquet",
                  node_prompts=tmp_path / "prompts.parquet", edge_reference=tmp_path / "edge_reference.parquet",
                  model=loaded, **outputs(tmp_path / "out"))
    auc = json.loads((tmp_path / "out" / "auc.json").read_text())
    assert auc["edges"]["skipped"] == doc["skipped"] and "sets" not in auc["edges"]
    assert all(0 <= r["roc_auc"]["top_k"] <= 1 for r in auc["nodes"]["methods"].values())
    assert (tmp_path / "out" / "roc.png").stat().st_size > 0
    assert "Edges skipped" in (tmp_path / "out" / "reference.md").read_text()
    # model.edge_circuits: false decides without loading a model (no dataset needed)
    edge_reference(CFG, model_cfg={"name": "gemma3_270m", "edge_circuits": False},
                       dataset=tmp_path / "missing.jsonl", edge_reference=tmp_path / "cfg_skip.parquet")
    assert "edge_circuits is false" in read_edge_reference(tmp_path / "cfg_skip.parquet")[1]["skipped"]
