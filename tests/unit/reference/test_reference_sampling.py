"""Layer-stratified edge sampling: every layer covered, proportional, reproducible with the seed."""

from __future__ import annotations

import pytest
import torch

from mechflow.circuits.graph import EdgeGraph
from mechflow.errors import ConfigError
from mechflow.reference.sampling import allocate, receiver_layers, stratified_sample

SMOLLM2 = EdgeGraph(30, 9)


def test_receiver_layers_follow_the_graph_layout():
    g = EdgeGraph(3, 4)
    layers = receiver_layers(g)
    for L in range(3):
        assert layers[g.qkv_receiver(L, "v", 3)] == L and layers[g.mlp_receiver(L)] == L
    assert layers[g.logits_receiver] == 3


def test_sample_covers_every_layer_is_proportional_and_reproducible():
    mask, strata = stratified_sample(SMOLLM2, 2000, 20, seed=0)
    assert SMOLLM2.n_edges == 123_211 and int(mask.sum()) == 2000
    assert not (mask & ~SMOLLM2.valid).any()
    layer_of = receiver_layers(SMOLLM2)
    per_layer = torch.bincount(layer_of[mask.nonzero()[:, 1]], minlength=31)
    assert (per_layer > 0).all() and len(strata) == 31  # every receiver layer, logits included
    assert per_layer.tolist() == [s["n_sampled"] for s in strata]
    assert strata[0]["n_sampled"] == 20 and strata[0]["n_edges"] == 37  # floor of min_per_layer
    big = strata[29]  # proportional beyond the floor: the last layer holds the most edges
    assert big["n_sampled"] > strata[10]["n_sampled"] > strata[1]["n_sampled"]
    assert big["weight"] == pytest.approx(big["n_edges"] / big["n_sampled"])
    again, _ = stratified_sample(SMOLLM2, 2000, 20, seed=0)
    other, _ = stratified_sample(SMOLLM2, 2000, 20, seed=1)
    assert torch.equal(mask, again) and not torch.equal(mask, other)


def test_allocation_edge_cases():
    assert allocate([3, 5, 10], 100, 2) == [3, 5, 10]  # more requested than exist: all
    # floor 2 each; the other 3 by capacity 1:3:8 -> quotas 0.25, 0.75, 2.0 -> largest remainder 0, 1, 2
    assert allocate([3, 5, 10], 9, 2) == [2, 3, 4]
    assert sum(allocate([37, 1000, 4000, 301], 500, 20)) == 500
    with pytest.raises(ConfigError, match="reference.n_sampled_edges"):
        allocate([10, 10, 10], 5, 2)
