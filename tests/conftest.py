"""Shared fixtures. Real-model fixtures are session-scoped and read-only: never modify weights."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from mechflow.testing import load_configured_model, make_tiny_llama

# Two cores: pin threads so parallel jobs/tests do not thrash (override with MECHFLOW_TEST_THREADS).
torch.set_num_threads(int(os.environ.get("MECHFLOW_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def smollm2():
    return load_configured_model("smollm2_135m")


@pytest.fixture(scope="session")
def gemma3():
    return load_configured_model("gemma3_270m")
