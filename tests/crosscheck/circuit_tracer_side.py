"""Runs INSIDE a circuit-tracer venv (not mechflow's): circuit-tracer's own graph-level code on a
graph that mechflow wrote.

    <circuit-tracer venv>/bin/python circuit_tracer_side.py graph.safetensors graph.json out.safetensors

Reads mechflow's unpruned graph (`graph.safetensors`: adjacency, selected_features, tokens,
logit_tokens, logit_probabilities, ...), builds circuit-tracer's `Graph` from it, and writes what
circuit-tracer computes — `compute_node_influence`, `prune_graph` (node mask, edge mask,
cumulative scores) at the thresholds given — into `out.safetensors`; validates mechflow's
Neuronpedia `graph.json` with circuit-tracer's `frontend.graph_models.Model` and prints one JSON line
(versions, counts). `tests/crosscheck/test_circuit_tracer.py` compares the outputs with mechflow's.
Imports nothing from mechflow on purpose.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def main(graph_path: str, json_path: str, out_path: str, node_threshold: float = 0.8,
         edge_threshold: float = 0.98) -> None:
    from circuit_tracer.frontend.graph_models import Model
    from circuit_tracer.graph import Graph, compute_node_influence, prune_graph
    from transformer_lens import HookedTransformerConfig

    torch.set_default_dtype(torch.float64)  # prune_graph's logit weights take the default dtype; mechflow's are float64
    with safe_open(graph_path, framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        n_layers = int(f.metadata()["n_layers"])
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=8, n_ctx=len(t["tokens"]) + 1, d_head=4,
                                  act_fn="relu", d_vocab=int(t["logit_tokens"].max()) + 1)  # only n_layers matters
    adjacency = t["adjacency"].double()
    graph = Graph(input_string="", input_tokens=t["tokens"], active_features=t["active_features"],
                  adjacency_matrix=adjacency, cfg=cfg, logit_tokens=t["logit_tokens"],
                  logit_probabilities=t["logit_probabilities"].double(),
                  selected_features=t["selected_features"], activation_values=t["activation_values"],
                  scan="mechflow")
    n_logits = len(t["logit_tokens"])
    weights = torch.zeros(adjacency.shape[0], dtype=torch.float64)
    weights[-n_logits:] = graph.logit_probabilities
    influence = compute_node_influence(adjacency, weights)
    pruned = prune_graph(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
    save_file({"node_influence": influence.contiguous(), "node_mask": pruned.node_mask.contiguous(),
               "edge_mask": pruned.edge_mask.contiguous(),
               "cumulative_scores": pruned.cumulative_scores.contiguous()}, out_path)
    with open(json_path) as fh:
        document = Model.model_validate(json.load(fh))
    print(json.dumps({"circuit_tracer": version("circuit-tracer"), "torch": torch.__version__,
                      "transformer_lens": version("transformer-lens"), "nodes_in_json": len(document.nodes),
                      "links_in_json": len(document.links), "kept_nodes": int(pruned.node_mask.sum()),
                      "kept_edges": int(pruned.edge_mask.sum())}))


if __name__ == "__main__":
    main(*sys.argv[1:4], *(float(x) for x in sys.argv[4:6]))
