"""Shared fixture of the graph tests: a tiny float64 llama, random per-layer transcoders and the
unpruned graph of one 8-token prompt (circuit-tracer's defaults, logits to 50% probability)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mechflow.graphs.attribution import attribute_prompt
from mechflow.testing import make_random_transcoders, make_tiny_llama


@pytest.fixture(scope="module")
def tiny_graph():
    tokens = torch.tensor([1, 7, 23, 4, 41, 9, 16, 30])
    model = make_tiny_llama(n_layers=3)
    transcoders = make_random_transcoders(model)
    graph = attribute_prompt(model, transcoders, tokens, desired_logit_prob=0.5)
    return SimpleNamespace(model=model, transcoders=transcoders, graph=graph, tokens=tokens)
