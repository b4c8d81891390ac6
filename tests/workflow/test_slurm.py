"""The SLURM profile against a real SLURM (issue 20): a single-node cluster started by the test
(`slurm_cluster.SlurmCluster`), part of the smoke DAG submitted through `workflow/profiles/slurm`
(snakemake-executor-plugin-slurm, job status through squeue as accounting is off), and its outputs
compared with the same targets run locally: byte for byte, JSON documents less their timing fields."""

from __future__ import annotations

import re
import subprocess

import pytest
from slurm_cluster import SlurmCluster, SlurmUnavailable
from smoke_subset import N_JOBS, OVERRIDES, TARGETS, differences
from test_dag import REPO, snakemake

SLURM_FLAGS = ["--workflow-profile", str(REPO / "workflow/profiles/slurm"), "--jobs", "2",
               "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
               "--seconds-between-status-checks", "2", "--latency-wait", "5", "--slurm-keep-successful-logs"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, slurm_tools):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        pytest.skip(f"no SLURM cluster: {exc}")
    yield cluster
    cluster.stop()


@pytest.mark.slow
def test_the_slurm_profile_runs_the_dag_on_a_real_cluster(slurm, subset_reference, tmp_path):
    cluster = tmp_path / "slurm"
    done = snakemake(*TARGETS, *SLURM_FLAGS, "--config", OVERRIDES, cwd=cluster, timeout=2400)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    job_ids = re.findall(r"submitted with SLURM jobid (\d+)", text)
    planned = re.search(r"^total\s+(\d+)", text, flags=re.M)
    assert planned and len(job_ids) == int(planned.group(1)) == N_JOBS, (job_ids, text[-2000:])
    states = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i %T"],
                            capture_output=True, text=True, check=True).stdout.split("\n")
    assert {line.split()[1] for line in states if line.strip()} == {"COMPLETED"}, states
    logs = {p.stem: p for p in (cluster / ".snakemake" / "slurm_logs").rglob("*.log")}
    for job_id in job_ids:  # each job's SLURM log, written by the job on the node
        assert "Finished jobid" in logs[job_id].read_text(), job_id
    assert differences(subset_reference, cluster) == []
