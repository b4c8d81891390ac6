"""The graph files: Neuronpedia / circuit-tracer frontend JSON (ids and types as circuit-tracer
spells them, validated against the JSON Schema of the pydantic mirror), the metadata index,
supernodes and the safetensors round trip."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from mechflow.contracts.graphs import GraphMetadataIndex, NeuronpediaGraph
from mechflow.graphs.export import (
    add_graph_metadata,
    graph_nodes,
    load_graph,
    neuronpedia_graph,
    save_graph,
    supernodes,
    write_graph_json,
)
from mechflow.graphs.influence import prune_graph


@pytest.fixture(scope="module")
def built(tiny_graph):
    graph = tiny_graph.graph
    pruned = prune_graph(graph.adjacency, graph.layout, graph.logit_probabilities, node_threshold=0.8,
                         edge_threshold=0.98)
    return tiny_graph.model, tiny_graph.transcoders, graph, pruned


def decode(token_id: int) -> str:
    return f"t{token_id}\n" if token_id == 7 else f"t{token_id}"


def test_frontend_json_matches_circuit_tracers_spelling(built, tmp_path):
    model, _, graph, pruned = built
    doc = neuronpedia_graph(graph, pruned, slug="tiny-ioi-0", scan="tiny", transcoder_list=["a", "b", "c"],
                            decode=decode, prompt="p", node_threshold=0.8)
    path = write_graph_json(tmp_path / "tiny-ioi-0.json", doc)
    data = json.loads(path.read_text())
    jsonschema.validate(data, NeuronpediaGraph.model_json_schema())
    nodes = {n["node_id"]: n for n in data["nodes"]}
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert kinds <= {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    # every embedding and logit node is present; one target logit, the most probable
    assert sum(n["feature_type"] == "embedding" for n in data["nodes"]) == graph.n_pos
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert len(logits) == graph.layout.n_logits and [n["is_target_logit"] for n in logits].count(True) == 1
    top = logits[0]
    assert top["node_id"] == f"4_{int(graph.logit_tokens[0])}_{graph.n_pos - 1}" and top["layer"] == "4"
    assert top["clerp"] == f'Output "t{int(graph.logit_tokens[0])}" (p={float(graph.logit_probabilities[0]):.3f})'
    assert top["jsNodeId"] == f"L_{int(graph.logit_tokens[0])}-{graph.n_pos - 1}"
    # newline made visible in prompt tokens, as circuit-tracer's process_token
    assert "t7⏎" in data["metadata"]["prompt_tokens"]
    for n in data["nodes"]:
        if n["feature_type"] == "cross layer transcoder":
            layer, feature, pos = map(int, n["node_id"].split("_"))
            assert n["feature"] == (layer + feature) * (layer + feature + 1) // 2 + feature
            assert n["jsNodeId"] == f"{layer}_{feature}-0" and n["activation"] > 0
        if n["feature_type"] == "mlp reconstruction error":
            assert n["node_id"] == f"{n['layer']}_-1_{n['ctx_idx']}" and n["feature"] == -1
    # links: kept edges only, weight = A[target, source], endpoints are nodes of the file
    index = {n.node_id: i for i, n in graph_nodes(graph, pruned, decode).items()}
    assert data["links"]
    for link in data["links"]:
        assert link["source"] in nodes and link["target"] in nodes
        t, s = index[link["target"]], index[link["source"]]
        assert bool(pruned.edge_mask[t, s])
        assert link["weight"] == pytest.approx(float(graph.adjacency[t, s]))
    assert len(data["links"]) == int(pruned.edge_mask[pruned.node_mask][:, pruned.node_mask].sum())


def test_metadata_index_adds_and_replaces_by_slug(built, tmp_path):
    _, _, graph, pruned = built
    index = tmp_path / "graph-metadata.json"
    for slug in ("b", "a", "b"):
        doc = neuronpedia_graph(graph, pruned, slug=slug, scan="tiny", transcoder_list=[], decode=decode,
                                prompt=slug, node_threshold=0.8)
        add_graph_metadata(index, doc.metadata)
    data = json.loads(index.read_text())
    jsonschema.validate(data, GraphMetadataIndex.model_json_schema())
    assert [g["slug"] for g in data["graphs"]] == ["a", "b"]


def test_supernodes_group_same_position_features_with_similar_decoders(built):
    _, transcoders, graph, pruned = built
    kept = [i for i in pruned.node_mask.nonzero().flatten().tolist() if i < graph.layout.n_features]
    feats = [graph.active_features[int(graph.selected_features[i])].tolist() for i in kept]
    # give two kept features at one position the same decoder direction (scaled): one supernode
    by_pos = {}
    for layer, pos, f in feats:
        by_pos.setdefault(pos, []).append((layer, f))
    pos, members = next((p, m) for p, m in by_pos.items() if len(m) >= 2)
    (l1, f1), (l2, f2) = members[:2]
    base = transcoders.transcoders[l1].W_dec[f1]

    def decoders(layer, feature):
        if (layer, feature) == (l2, f2):
            return 3 * base
        return transcoders.transcoders[layer].W_dec[feature]

    groups = supernodes(graph, pruned, decoders, min_cosine=0.99)
    assert [g[1:] for g in groups] == [sorted([f"{l1}_{f1}_{pos}", f"{l2}_{f2}_{pos}"],
                                              key=lambda s: tuple(map(int, s.split("_")[:2])))]
    assert groups[0][0].startswith(f"pos {pos}: ")


def test_graph_round_trips_through_safetensors(built, tmp_path):
    _, _, graph, _ = built
    path = save_graph(tmp_path / "graph.safetensors", graph, {"prompt": "p"})
    back = load_graph(path)
    assert back.n_layers == graph.n_layers
    for name in ("tokens", "adjacency", "selected_features", "active_features", "logit_probabilities"):
        assert torch.equal(getattr(back, name), getattr(graph, name))
