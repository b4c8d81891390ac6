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


def debian_tool(names: tuple[str, ...], package: str) -> str:
    """The first of `names` on PATH, else Debian's `package` installed with apt when running as root
    (CI machines), else the calling test is skipped with the reason."""
    import shutil
    import subprocess

    for name in names:
        if shutil.which(name):
            return shutil.which(name)
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"no {names[0]} on PATH and no root apt-get to install it (apt-get install {package})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.skip(f"could not install {package} ({' '.join(cmd)}: {done.stderr.strip()[-300:]})")
    if not shutil.which(names[0]):
        pytest.skip(f"apt-get install {package} did not put {names[0]} on PATH")
    return shutil.which(names[0])


@pytest.fixture(scope="session")
def chromium():
    """A headless Chromium for browser tests (`debian_tool`)."""
    return debian_tool(("chromium", "chromium-browser", "google-chrome"), "chromium")


@pytest.fixture(scope="session")
def poppler():
    """Directory of poppler-utils' pdftotext / pdftoppm (`debian_tool`: PATH, else apt, else skip)."""
    from pathlib import Path

    return Path(debian_tool(("pdftotext",), "poppler-utils")).parent


@pytest.fixture(scope="session")
def slurm_tools():
    """Debian's slurm-wlm and munge (`debian_tool`: PATH, else apt, else skip) for the real-SLURM test."""
    debian_tool(("munged",), "munge")
    return debian_tool(("slurmctld",), "slurm-wlm")
