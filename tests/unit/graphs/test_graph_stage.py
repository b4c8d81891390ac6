"""The attribution_graph stage end to end on a tiny model with saved per-layer transcoders: every
file is written and valid, the numbers of graph.json are recomputable from graph.safetensors, and
the set's helpers (circuit-tracer layout, layer planning) behave."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from mechflow.contracts.dictionaries import TranscoderIndex, TranscoderSetDocument
from mechflow.contracts.documents import write_document
from mechflow.contracts.graphs import GraphSummary, NeuronpediaGraph
from mechflow.dictionaries.config import TranscoderSetConfig
from mechflow.dictionaries.transcoder import JumpReLUTranscoderStack, save_stack
from mechflow.dictionaries.transcoder_set import harvest_groups, load_set_stack, write_circuit_tracer_set
from mechflow.errors import ConfigError
from mechflow.graphs.export import load_graph
from mechflow.graphs.influence import graph_scores
from mechflow.graphs.stage import attribution_graph, graphs_summary, pruned_adjacency
from mechflow.testing import make_tiny_llama

TOKENS = [1, 7, 23, 4, 41, 9, 16, 30]


def write_set(tmp_path: Path, model, d_sae: int = 16) -> tuple[Path, list[Path]]:
    folders = []
    d = model.cfg.d_model
    for layer in range(model.cfg.n_layers):
        stack = JumpReLUTranscoderStack(1, d, d, d_sae, "per_layer", init_threshold=0.3, seed=layer)
        with torch.no_grad():
            g = torch.Generator().manual_seed(layer)
            stack.W_enc.copy_(torch.randn(1, d, d_sae, generator=g) / d ** 0.5)
            stack.b_enc.copy_(torch.randn(1, d_sae, generator=g) * 0.1)
            stack.W_dec_stack.copy_(torch.randn(1, d_sae, d, generator=g) * 0.3)
        folder = tmp_path / "set" / f"layer_{layer}"
        index = save_stack(stack, folder, layers=[layer], in_hooks=[f"blocks.{layer}.ln2.hook_normalized"],
                           out_hooks=[f"blocks.{layer}.hook_mlp_out"], metadata={})
        write_document(folder / "transcoder.json", TranscoderIndex, index)
        folders.append(folder)
    set_json = tmp_path / "set.json"
    L = model.cfg.n_layers
    write_document(set_json, TranscoderSetDocument, {
        "stage": "transcoder_set", "kind": "per_layer", "layers": list(range(L)),
        "in_hooks": [f"blocks.{i}.ln2.hook_normalized" for i in range(L)],
        "out_hooks": [f"blocks.{i}.hook_mlp_out" for i in range(L)], "d_sae": d_sae, "per_layer": [],
        "mean_fvu": 0.0, "max_fvu": 0.0, "mean_l0": 0.0, "mean_dead_fraction": 0.0, "training_seconds": 0.0,
        "whole_model": {}, "circuit_tracer": "", "folders": [str(f) for f in folders]})
    return set_json, folders


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("graph_stage")
    model = make_tiny_llama(n_layers=3)
    set_json, folders = write_set(tmp, model)
    dataset = tmp / "dataset.jsonl"
    dataset.write_text(json.dumps({"id": 0, "prompt": "p", "corrupted_prompt": "q", "answer": " a",
                                   "wrong_answer": " b", "template": None, "clean_ids": TOKENS,
                                   "corrupted_ids": TOKENS, "answer_id": 3, "wrong_id": 5, "good_ids": [3],
                                   "bad_ids": [5]}) + "\n")
    loaded = SimpleNamespace(model=model, tokenizer=SimpleNamespace(decode=lambda ids: f"t{ids[0]}",
                                                                    bos_token_id=1),
                             card=SimpleNamespace(bos_token_id=1))
    out = tmp / "graphs" / "ioi"
    files = {"graph": out / "p0" / "graph.safetensors", "summary": out / "p0" / "graph.json",
             "neuronpedia": out / "ioi-p0.json", "viewer": out / "p0" / "viewer.html",
             "figure": out / "p0" / "graph.png", "validation": out / "p0" / "validation.parquet",
             "validation_figure": out / "p0" / "validation.png", "supernodes_file": out / "p0" / "supernodes.json"}
    cfg = {"tasks": ["ioi"], "prompts": [0], "validation_features": 4,
           "desired_logit_prob": 0.5}
    result = attribution_graph(cfg, transcoder_set=set_json, dataset=dataset, tokens=None, top_contexts=None,
                               task="ioi", prompt=0, model_cfg={}, loaded_model=loaded, **files)
    return model, folders, files, result, out


def test_every_file_is_written_and_valid(built):
    _, _, files, result, _ = built
    for path in files.values():
        assert Path(path).exists(), path
    GraphSummary.model_validate(json.loads(files["summary"].read_text()))
    NeuronpediaGraph.model_validate(json.loads(files["neuronpedia"].read_text()))
    table = pl.read_parquet(files["validation"])
    assert table.height == result["validation"]["n_interventions"] == 4 * 5 * 2  # 5 operations, 2 feature sets
    assert set(table["selection"]) == {"top", "excluding_positions"}
    assert result["validation"]["frozen_max_abs_error"] < 1e-6
    assert "answer" in result and result["answer_id"] in [g["token_id"] for g in result["logits"]]


def test_summary_numbers_are_recomputable_from_the_saved_graph(built):
    _, _, files, result, _ = built
    graph = load_graph(files["graph"])
    rep, comp = graph_scores(graph.adjacency, graph.layout, graph.logit_probabilities)
    assert result["scores"]["replacement"] == pytest.approx(rep)
    assert result["scores"]["completeness"] == pytest.approx(comp)
    assert result["n_feature_nodes"] == graph.layout.n_features
    from mechflow.graphs.influence import prune_graph

    pruned = prune_graph(graph.adjacency, graph.layout, graph.logit_probabilities)
    rep_p, _ = graph_scores(pruned_adjacency(graph, pruned.node_mask, pruned.edge_mask), graph.layout,
                            graph.logit_probabilities)
    assert result["scores"]["replacement_pruned"] == pytest.approx(rep_p)
    assert sum(result["error_share_per_layer"]) <= 1 + 1e-9


def test_graphs_summary_lists_every_graph(built, tmp_path):
    _, _, files, _, out = built
    graphs_summary({}, summaries=[files["summary"]], neuronpedia=[files["neuronpedia"]],
                   metadata=out / "graph-metadata.json", markdown=out / "graphs.md", task="ioi")
    meta = json.loads((out / "graph-metadata.json").read_text())
    assert [g["slug"] for g in meta["graphs"]] == ["ioi-p0"]
    md = (out / "graphs.md").read_text()
    assert "ioi-p0" in md and str(files["summary"]) in md and "Top paths" in md


def test_circuit_tracer_layout_of_the_set(built, tmp_path):
    model, folders, _, _, _ = built
    stack, layers, in_hooks, out_hooks = load_set_stack(folders)
    out = write_circuit_tracer_set(stack, layers, in_hooks, out_hooks, tmp_path / "ct", "tiny")
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set"
    assert config["feature_input_hook"] == "ln2.hook_normalized" and config["feature_output_hook"] == "hook_mlp_out"
    assert config["transcoders"] == [f"layer_{i}.safetensors" for i in range(3)]
    state = load_file(out / "layer_1.safetensors")
    torch.testing.assert_close(state["W_enc"], stack.W_enc[1].T)  # circuit-tracer's F.linear layout
    torch.testing.assert_close(state["activation_function.threshold"], stack.threshold[1])
    assert state["W_dec"].shape == (16, model.cfg.d_model)


def test_layer_planning_needs_the_layer_count():
    cfg = TranscoderSetConfig(layers_per_harvest=4)
    assert harvest_groups(cfg, {"name": "m", "n_layers": 10}) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ConfigError, match="model.n_layers"):
        harvest_groups(cfg, {"name": "m"})
    with pytest.raises(ConfigError, match="transcoder_set.layers"):
        harvest_groups(TranscoderSetConfig(layers=[3, 1]), {"name": "m", "n_layers": 10})
    assert cfg.for_layer(7).layers == [7]
