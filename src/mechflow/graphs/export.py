"""Write an attribution graph: the full graph as safetensors, the pruned graph as the Neuronpedia /
circuit-tracer frontend JSON (`mechflow.contracts.graphs`), the frontend's ``graph-metadata.json``
index, and supernodes.

The JSON is built as circuit-tracer's `utils/create_graph_files.py` builds it: nodes of the
pruned node mask with their cumulative influence, links of the pruned edge mask (``source`` →
``target`` with weight ``A[target, source]``), then only the nodes that some kept link touches,
plus every embedding and logit node; the first logit node (the most probable token) is the target
logit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from mechflow.contracts.documents import load_document, write_document
from mechflow.contracts.graphs import (
    GraphLink,
    GraphMetadata,
    GraphMetadataIndex,
    GraphNode,
    NeuronpediaGraph,
    QParams,
)
from mechflow.errors import DataError
from mechflow.graphs.attribution import AttributionGraph
from mechflow.graphs.influence import PruneResult
from mechflow.io import atomic_path

GRAPH_TENSORS = ("tokens", "logit_tokens", "logit_probabilities", "active_features", "activation_values",
                 "selected_features", "adjacency")
METADATA_INDEX = "graph-metadata.json"


def process_token(token: str) -> str:
    """circuit-tracer's `process_token`: newlines, tabs and carriage returns made visible."""
    return token.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def cantor_pairing(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def feature_node(layer: int, pos: int, feature: int, influence: float | None, activation: float | None) -> GraphNode:
    return GraphNode(node_id=f"{layer}_{feature}_{pos}", feature=cantor_pairing(layer, feature), layer=str(layer),
                     ctx_idx=pos, feature_type="cross layer transcoder", jsNodeId=f"{layer}_{feature}-0",
                     influence=influence, activation=activation)


def error_node(layer: int, pos: int, influence: float | None) -> GraphNode:
    return GraphNode(node_id=f"{layer}_-1_{pos}", feature=-1, layer=str(layer), ctx_idx=pos,
                     feature_type="mlp reconstruction error", jsNodeId=f"{layer}_-1-{pos}", influence=influence)


def token_node(pos: int, token_id: int, influence: float | None) -> GraphNode:
    return GraphNode(node_id=f"E_{token_id}_{pos}", feature=pos, layer="E", ctx_idx=pos, feature_type="embedding",
                     jsNodeId=f"E_{token_id}-{pos}", influence=influence)


def logit_node(pos: int, token_id: int, token: str, n_layers: int, target: bool, prob: float) -> GraphNode:
    layer = str(n_layers + 1)
    return GraphNode(node_id=f"{layer}_{token_id}_{pos}", feature=token_id, layer=layer, ctx_idx=pos,
                     feature_type="logit", token_prob=prob, is_target_logit=target, jsNodeId=f"L_{token_id}-{pos}",
                     clerp=f'Output "{token}" (p={prob:.3f})')


def graph_nodes(graph: AttributionGraph, pruned: PruneResult, decode: Callable[[int], str]) -> dict[int, GraphNode]:
    """Frontend nodes of the kept node indices (circuit-tracer's `create_nodes`)."""
    layout, P, L = graph.layout, graph.n_pos, graph.n_layers
    scores = pruned.cumulative_scores
    nodes: dict[int, GraphNode] = {}
    for idx in pruned.node_mask.nonzero().flatten().tolist():
        influence = float(scores[idx])
        if idx < layout.n_features:
            active = int(graph.selected_features[idx])
            layer, pos, feature = graph.active_features[active].tolist()
            nodes[idx] = feature_node(layer, pos, feature, influence, float(graph.activation_values[active]))
        elif idx < layout.tokens.start:
            layer, pos = divmod(idx - layout.n_features, P)
            nodes[idx] = error_node(layer, pos, influence)
        elif idx < layout.logits.start:
            pos = idx - layout.tokens.start
            nodes[idx] = token_node(pos, int(graph.tokens[pos]), influence)
        else:
            k = idx - layout.logits.start
            token_id = int(graph.logit_tokens[k])
            nodes[idx] = logit_node(P - 1, token_id, process_token(decode(token_id)), L, k == 0,
                                    float(graph.logit_probabilities[k]))
    return nodes


def neuronpedia_graph(graph: AttributionGraph, pruned: PruneResult, *, slug: str, scan: str,
                      transcoder_list: Sequence[str], decode: Callable[[int], str], prompt: str,
                      node_threshold: float, supernodes: Sequence[Sequence[str]] = ()) -> NeuronpediaGraph:
    """The pruned graph as the frontend's JSON model (circuit-tracer's `create_graph_files` steps)."""
    nodes = graph_nodes(graph, pruned, decode)
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency[targets, sources].tolist()
    links = [GraphLink(source=nodes[s].node_id, target=nodes[t].node_id, weight=w)
             for s, t, w in zip(sources.tolist(), targets.tolist(), weights, strict=True) if s in nodes and t in nodes]
    connected = {link.source for link in links} | {link.target for link in links}
    used = [n for n in nodes.values() if n.node_id in connected or n.feature_type in ("embedding", "logit")]
    metadata = GraphMetadata(slug=slug, scan=scan, transcoder_list=list(transcoder_list),
                             prompt_tokens=[process_token(decode(int(t))) for t in graph.tokens], prompt=prompt,
                             node_threshold=node_threshold)
    qparams = QParams(pinnedIds=[], supernodes=[list(s) for s in supernodes], linkType="both", clickedId="",
                      sg_pos="")
    return NeuronpediaGraph(metadata=metadata, qParams=qparams, nodes=used, links=links)


def supernodes(graph: AttributionGraph, pruned: PruneResult, decoders: Callable[[int, int], Tensor],
               min_cosine: float = 0.7) -> list[list[str]]:
    """Groups of kept feature nodes at the same position whose decoder directions have cosine ≥
    ``min_cosine`` (connected components of that relation), each ``[label, node_id, ...]`` as the
    frontend's ``qParams.supernodes``; singletons are not groups. ``decoders(layer, feature)`` is
    the feature's decoder row. The label names the position and members' layers; users rename it
    in the editable ``supernodes.json``."""
    kept = [i for i in pruned.node_mask.nonzero().flatten().tolist() if i < graph.layout.n_features]
    by_pos: dict[int, list[tuple[int, int, int]]] = {}
    for idx in kept:
        layer, pos, feature = graph.active_features[int(graph.selected_features[idx])].tolist()
        by_pos.setdefault(pos, []).append((layer, feature, idx))
    groups: list[list[str]] = []
    for pos in sorted(by_pos):
        members = by_pos[pos]
        if len(members) < 2:
            continue
        vecs = torch.stack([decoders(layer, feature).double() for layer, feature, _ in members])
        vecs = vecs / vecs.norm(dim=1, keepdim=True).clamp(min=1e-12)
        linked = (vecs @ vecs.T) >= min_cosine
        parent = list(range(len(members)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i, j in linked.nonzero().tolist():
            parent[find(i)] = find(j)
        components: dict[int, list[int]] = {}
        for i in range(len(members)):
            components.setdefault(find(i), []).append(i)
        for comp in components.values():
            if len(comp) < 2:
                continue
            comp.sort(key=lambda i: (members[i][0], members[i][1]))
            layers = sorted({members[i][0] for i in comp})
            label = f"pos {pos}: L{layers[0]}" + (f"-L{layers[-1]}" if len(layers) > 1 else "") + f" ({len(comp)})"
            groups.append([label, *(f"{members[i][0]}_{members[i][1]}_{pos}" for i in comp)])
    return groups


def write_graph_json(path: str | Path, document: NeuronpediaGraph) -> Path:
    return write_document(path, NeuronpediaGraph, document.model_dump(mode="json"))


def add_graph_metadata(index_path: str | Path, metadata: GraphMetadata) -> Path:
    """Add (or replace, by slug) a graph's metadata in the frontend's ``graph-metadata.json``."""
    index_path = Path(index_path)
    graphs: list[dict] = []
    if index_path.exists():
        graphs = load_document(index_path, GraphMetadataIndex, fix=f"delete {index_path}; it is rebuilt")["graphs"]
    graphs = [g for g in graphs if g["slug"] != metadata.slug] + [metadata.model_dump(mode="json")]
    graphs.sort(key=lambda g: g["slug"])
    return write_document(index_path, GraphMetadataIndex, {"graphs": graphs})


def save_graph(path: str | Path, graph: AttributionGraph, metadata: dict[str, str] | None = None) -> Path:
    """The unpruned graph's tensors as safetensors (atomically); ``metadata`` strings go into the header."""
    from safetensors.torch import save_file

    tensors = {name: getattr(graph, name).contiguous() for name in GRAPH_TENSORS}
    header = {"n_layers": str(graph.n_layers), **(metadata or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return Path(path)


def load_graph(path: str | Path) -> AttributionGraph:
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} is missing: re-run the attribution_graph stage")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in GRAPH_TENSORS}
    if "n_layers" not in header:
        raise DataError(f"{path} is not a graph written by mechflow (no n_layers in its header): re-run the stage")
    return AttributionGraph(**tensors, n_layers=int(header["n_layers"]))


def graph_header(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})

