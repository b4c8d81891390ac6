"""Kill anywhere, lose nothing (issue 20): the smoke subset is SIGKILLed (the whole process group:
Snakemake and its jobs) at random moments inside harvest, SAE training, transcoder training, attribution
and the circuit stage, then the same command is run again (after `snakemake --unlock`, which a kill always needs:
Snakemake cannot tell a dead lock holder from a live one) until it finishes. The results must equal an
uninterrupted run's (`smoke_subset.differences`: bytes, JSON less timing fields), with no temp file
left behind."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from smoke_subset import OVERRIDES, RUN, TARGETS, differences
from test_dag import REPO, SNAKEMAKE, snakemake

KILLED_IN = ("harvest", "train_sae", "train_transcoder", "attribute", "circuits")
PROFILE = ["--workflow-profile", str(REPO / "workflow/profiles/default")]
RULE_START = re.compile(r"^(?:local)?rule (\w+):", re.M)


def run_until_killed(folder: Path, remaining: set[str], rng: random.Random, log: Path) -> str | None:
    """Start the subset; as soon as a job of a rule in `remaining` starts, SIGKILL everything after a
    random 0.3-3 s. Returns that rule (None: the run finished first). Which rule starts first depends on
    Snakemake's scheduling (train_sae and train_transcoder start together once the harvest is done), so
    each phase kills inside whichever not-yet-killed stage starts first; every stage outlives the delay."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([*SNAKEMAKE, "--directory", str(folder), *TARGETS, "--cores", "2", *PROFILE,
                                 "--config", OVERRIDES], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        deadline = time.monotonic() + 1200  # a hang guard
        started = None
        while proc.poll() is None and started is None and time.monotonic() < deadline:
            time.sleep(0.2)
            started = next((r for r in RULE_START.findall(log.read_text()) if r in remaining), None)
        if started is None or proc.poll() is not None:
            return None
        time.sleep(rng.uniform(0.3, 3.0))
        if proc.poll() is not None:
            return None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return started


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_anywhere_then_rerun_gives_identical_results(subset_reference, tmp_path, seed):
    rng = random.Random(seed)
    folder = tmp_path / "run"
    killed: list[str] = []
    while len(killed) < len(KILLED_IN):
        rule = run_until_killed(folder, set(KILLED_IN) - set(killed), rng, tmp_path / f"phase{len(killed)}.log")
        if rule is None:
            break
        killed.append(rule)
        unlock = snakemake("--unlock", "--config", OVERRIDES, cwd=folder)
        assert unlock.returncode == 0, unlock.stderr[-2000:]
    assert sorted(killed) == sorted(KILLED_IN), killed  # a kill inside every one of the stages
    done = snakemake(*TARGETS, "--cores", "2", *PROFILE, "--config", OVERRIDES, cwd=folder, timeout=2400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert differences(subset_reference, folder) == []
    stray = [str(p) for p in (folder / RUN).rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
    assert stray == []
