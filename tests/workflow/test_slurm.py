"""The SLURM profile against a real SLURM (issue 20): a single-node cluster started by the test
(`slurm_cluster.SlurmCluster`), part of the smoke DAG submitted through `workflow/profiles/slurm`
(snakemake-executor-plugin-slurm, job status through squeue as accounting is off), and its outputs
compared with the same targets run locally: byte for byte, JSON documents less their timing fields."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, SlurmUnavailable
from test_dag import REPO, snakemake

OVERRIDES = "overrides=+experiment=smoke task=[ioi]"
RUN = "results/smollm2_135m"
# harvest (shards and manifests), SAE training and its metrics, attribution, the circuit: 8 jobs
TARGETS = [f"{RUN}/{p}" for p in ("tasks/ioi/baseline.json", "dictionaries/sae_metrics.json",
                                  "attribution/ioi/agreement.json", "circuits/ioi/circuit.json")]
SLURM_FLAGS = ["--workflow-profile", str(REPO / "workflow/profiles/slurm"), "--jobs", "2",
               "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
               "--seconds-between-status-checks", "2", "--latency-wait", "5", "--slurm-keep-successful-logs"]
# fields that measure time, not results: dropped before JSON documents are compared
TIMING = re.compile(r"(^|_)(seconds|per_second|elapsed_s|started_at|finished_at|timestamp)$")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, slurm_tools):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        pytest.skip(f"no SLURM cluster: {exc}")
    yield cluster
    cluster.stop()


def _without_timing(doc):
    if isinstance(doc, dict):
        return {k: _without_timing(v) for k, v in doc.items() if not TIMING.search(k)}
    if isinstance(doc, list):
        return [_without_timing(v) for v in doc]
    return doc


def result_files(folder: Path) -> dict[str, Path]:
    """The run's result files (logs and the tracker's folder are not results)."""
    run = folder / RUN
    return {str(p.relative_to(run)): p for p in sorted(run.rglob("*"))
            if p.is_file() and not str(p.relative_to(run)).startswith(("logs/", "wandb/"))}


def differences(a: Path, b: Path) -> list[str]:
    left, right = result_files(a), result_files(b)
    out = [f"only in one run: {name}" for name in sorted(set(left) ^ set(right))]
    for name in sorted(set(left) & set(right)):
        x, y = left[name].read_bytes(), right[name].read_bytes()
        if x == y:
            continue
        if name.endswith(".json") and _without_timing(json.loads(x)) == _without_timing(json.loads(y)):
            continue
        out.append(f"differs: {name}")
    return out


@pytest.mark.slow
def test_the_slurm_profile_runs_the_dag_on_a_real_cluster(slurm, tmp_path):
    local, cluster = tmp_path / "local", tmp_path / "slurm"
    done = snakemake(*TARGETS, "--cores", "2", "--config", OVERRIDES, cwd=local, timeout=2400)
    assert done.returncode == 0, done.stderr[-3000:]
    done = snakemake(*TARGETS, *SLURM_FLAGS, "--config", OVERRIDES, cwd=cluster, timeout=2400)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    job_ids = re.findall(r"submitted with SLURM jobid (\d+)", text)
    planned = re.search(r"^total\s+(\d+)", text, flags=re.M)
    assert planned and len(job_ids) == int(planned.group(1)) == 8, (job_ids, text[-2000:])
    states = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i %T"],
                            capture_output=True, text=True, check=True).stdout.split("\n")
    assert {line.split()[1] for line in states if line.strip()} == {"COMPLETED"}, states
    logs = {p.stem: p for p in (cluster / ".snakemake" / "slurm_logs").rglob("*.log")}
    for job_id in job_ids:  # each job's SLURM log, written by the job on the node
        assert "Finished jobid" in logs[job_id].read_text(), job_id
    assert differences(local, cluster) == []
