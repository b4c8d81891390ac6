"""mechflow's graph-level algebra against circuit-tracer's own code, number by number.

circuit-tracer cannot share mechflow's environment, so it runs in its own venv (`make
circuit-tracer-venv`; offline with `CIRCUIT_TRACER_SRC=<local clone>`): this test writes an IOI
graph of SmolLM2 (random transcoders: the algebra, not the dictionaries, is under test), runs
`tests/crosscheck/circuit_tracer_side.py` in that venv — circuit-tracer's `compute_node_influence`
and `prune_graph` on mechflow's adjacency, and its frontend `Model` on mechflow's graph JSON — and
compares with `mechflow.graphs.influence`. Skipped, with the reason, when that venv cannot be built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mechflow.graphs.attribution import attribute_prompt
from mechflow.graphs.export import neuronpedia_graph, save_graph, write_graph_json
from mechflow.graphs.influence import prune_graph
from mechflow.testing import make_random_transcoders

ROOT = Path(__file__).resolve().parents[3]
SIDE = ROOT / "tests" / "crosscheck" / "circuit_tracer_side.py"
IOI = "When Mary and John went to the store, John gave a drink to"


def circuit_tracer_python() -> Path:
    """The circuit-tracer venv's python: `$MECHFLOW_CIRCUIT_TRACER_PYTHON`, else `make circuit-tracer-venv`'s
    (built now when its source is reachable); pytest.skip with the reason otherwise."""
    given = os.environ.get("MECHFLOW_CIRCUIT_TRACER_PYTHON")
    if given:
        return Path(given)
    venv = ROOT / ".venv-circuit-tracer"
    if not (venv / ".mechflow-setup").exists():
        src = os.environ.get("CIRCUIT_TRACER_SRC", "")
        if src and not src.startswith("git+") and not Path(src).exists():
            pytest.skip(f"CIRCUIT_TRACER_SRC={src} does not exist")
        if not src:
            probe = subprocess.run(["git", "ls-remote", "https://github.com/safety-research/circuit-tracer", "HEAD"],
                                   capture_output=True, text=True, timeout=60)
            if probe.returncode != 0:
                pytest.skip("circuit-tracer's venv cannot be built: github.com is unreachable (offline?); "
                            "run `make circuit-tracer-venv CIRCUIT_TRACER_SRC=<local clone of "
                            "safety-research/circuit-tracer>` first")
        build = subprocess.run(["make", "circuit-tracer-venv"], cwd=ROOT, capture_output=True, text=True,
                               timeout=1800)
        if build.returncode != 0:
            pytest.skip(f"`make circuit-tracer-venv` failed: {build.stderr[-800:]}")
    return venv / "bin" / "python"


@pytest.mark.slow
def test_pruning_influence_and_json_agree_with_circuit_tracer(smollm2, tmp_path):
    ct_python = circuit_tracer_python()
    model = smollm2.model
    tokens = smollm2.to_tokens(IOI)[0]
    transcoders = make_random_transcoders(model, d_sae=64, scale=0.05)
    graph = attribute_prompt(model, transcoders, tokens, max_feature_nodes=256, batch_size=64)
    pruned = prune_graph(graph.adjacency, graph.layout, graph.logit_probabilities)
    document = neuronpedia_graph(graph, pruned, slug="ioi-p0", scan="mechflow-random", transcoder_list=[],
                                 decode=lambda i: smollm2.tokenizer.decode([i]), prompt=IOI, node_threshold=0.8)
    graph_path = save_graph(tmp_path / "graph.safetensors", graph)
    json_path = write_graph_json(tmp_path / "ioi-p0.json", document)
    out = tmp_path / "circuit_tracer.safetensors"
    run = subprocess.run([str(ct_python), str(SIDE), str(graph_path), str(json_path), str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    theirs = load_file(str(out))

    torch.testing.assert_close(theirs["node_influence"], pruned.node_influence, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(theirs["cumulative_scores"], pruned.cumulative_scores, rtol=1e-9, atol=1e-12)
    assert torch.equal(theirs["node_mask"], pruned.node_mask)
    assert torch.equal(theirs["edge_mask"], pruned.edge_mask)
    assert report["nodes_in_json"] == len(document.nodes) and report["links_in_json"] == len(document.links)
    assert 0 < report["kept_nodes"] < graph.adjacency.shape[0]  # the pruning did prune, and kept a graph
    print(json.dumps(report), file=sys.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("skip", [False, True])
def test_model_level_attribution_agrees_with_circuit_tracer(smollm2, tmp_path, skip):
    """circuit-tracer's own `attribute` on SmolLM2 with the same (random) transcoders, built from the
    local HF weights: the same logit nodes, the same active and selected features, the same edges;
    with skip transcoders too (their linear term is a path at BOS as elsewhere, as circuit-tracer's)."""
    ct_python = circuit_tracer_python()
    sys.path.insert(0, str(SIDE.parent))
    from model_level import run

    from mechflow.models.registry import load_hf_reference

    hf_model, hf_tokenizer = load_hf_reference("smollm2_135m", "float32")
    transcoders = make_random_transcoders(smollm2.model, d_sae=64, scale=0.05, skip=skip)
    tokens = [int(t) for t in smollm2.to_tokens(IOI)[0]]
    result = run(ct_python, tmp_path, smollm2, hf_model, hf_tokenizer, transcoders, tokens, max_feature_nodes=64,
                 batch_size=32)
    print(json.dumps(result), file=sys.stderr)
    assert result["same_logit_tokens"] and result["active_features_equal"]
    assert result["feature_jaccard"] == 1.0
    assert result["relative_max_diff"] < 1e-4 and result["pearson"] > 0.99999
