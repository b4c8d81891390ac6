"""Helpers for circuit tests (not a conftest: `from mechflow.testing import` must reach tests/conftest.py): random token pairs on the tiny llama and a linear-tail variant."""

from __future__ import annotations

import pytest
import torch
from mechflow.testing import make_tiny_llama

from mechflow.attribution.patching import TokenPairs
from mechflow.circuits.result import LogitDiffSpec

CORRECT, INCORRECT = [3, 11, 29, 17, 5], [7, 2, 41, 30, 44]


def spec(n: int = 3) -> LogitDiffSpec:
    return LogitDiffSpec(correct_ids=CORRECT[:n], incorrect_ids=INCORRECT[:n])


def pairs(seed: int = 0, n: int = 3, pos: int = 6) -> TokenPairs:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 50, (n, pos), generator=g)
    corr = torch.randint(0, 50, (n, pos), generator=g)
    return TokenPairs(clean, corr, spec(n).build())


@pytest.fixture(scope="module")
def linear_tail():
    """ln_final replaced by the identity: the metric is linear in the logits receiver's input."""
    model = make_tiny_llama(seed=5)
    model.ln_final = torch.nn.Identity()
    return model
