"""Kill anywhere, lose nothing (issue 20): the smoke subset is SIGKILLed (the whole process group:
Snakemake and its jobs) at random moments inside harvest, SAE training, transcoder training, attribution
and the circuit stage, then the same command is run again (after `snakemake --unlock`, which a kill always needs:
Snakemake cannot tell a dead lock holder from a live one) until it finishes. The results must equal an
uninterrupted run's (`smoke_subset.differences`: bytes, JSON less timing fields), with no temp file
left behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from smoke_subset import OVERRIDES, RUN, TARGETS, differences
from test_dag import REPO, SNAKEMAKE, snakemake

KILLED_IN = ("harvest", "train_sae", "train_transcoder", "attribute", "circuits")  # DAG order
PROFILE = ["--workflow-profile", str(REPO / "workflow/profiles/default")]


def run_until_killed(folder: Path, rule: str, rng: random.Random, log: Path) -> bool:
    """Start the subset; once `rule`'s job has started, SIGKILL everything after a random 0.3-3 s.
    Returns whether the kill happened (False: the run finished first)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([*SNAKEMAKE, "--directory", str(folder), *TARGETS, "--cores", "2", *PROFILE,
                                 "--config", OVERRIDES], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        deadline = time.monotonic() + 1200  # a hang guard
        while proc.poll() is None and f"rule {rule}:" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        if proc.poll() is not None:
            return False
        time.sleep(rng.uniform(0.3, 3.0))
        if proc.poll() is not None:
            return False
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return True


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_anywhere_then_rerun_gives_identical_results(subset_reference, tmp_path, seed):
    rng = random.Random(seed)
    folder = tmp_path / "run"
    killed = []
    for rule in KILLED_IN:
        if run_until_killed(folder, rule, rng, tmp_path / f"{rule}.log"):
            killed.append(rule)
            unlock = snakemake("--unlock", "--config", OVERRIDES, cwd=folder)
            assert unlock.returncode == 0, unlock.stderr[-2000:]
    assert len(killed) >= 4, killed  # the kills happened inside the stages
    done = snakemake(*TARGETS, "--cores", "2", *PROFILE, "--config", OVERRIDES, cwd=folder, timeout=2400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert differences(subset_reference, folder) == []
    stray = [str(p) for p in (folder / RUN).rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
    assert stray == []
