"""Parse a Snakemake dry run into its job set: one (rule, inputs, outputs) record per job.

`tests/workflow/data/planned_jobs_*.json` hold the job sets planned before the architecture step
of issue 15; `test_dag.py::test_dry_run_plans_the_recorded_job_set` fails when a refactor changes
what the DAG plans. Regenerate deliberately (after a listed, user-visible path change) with
`python tests/workflow/planned_jobs.py` and name the change in CHANGELOG.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
# name -> overrides (as passed to --config overrides=...)
SCENARIOS = {
    "default": None,
    "sweep_benchmark": '["model=smollm2_135m,gemma3_270m","benchmark.enabled=true"]',
}


def parse_jobs(stdout: str) -> list[dict]:
    """Each `rule X:` / `localrule X:` block of a dry run -> {rule, input, output}, sorted."""
    jobs, current = [], None
    for line in stdout.splitlines():
        stripped = line.strip()
        if line.startswith(("rule ", "localrule ")) and line.rstrip().endswith(":"):
            current = {"rule": line.split()[1].rstrip(":"), "input": [], "output": []}
            jobs.append(current)
        elif current is not None and stripped.startswith(("input:", "output:")):
            key, _, value = stripped.partition(":")
            current[key] = sorted(v.strip() for v in value.split(",") if v.strip())
        elif not line.startswith(" "):
            current = None if not line.startswith("[") else current
    return sorted(jobs, key=lambda j: (j["rule"], j["output"], j["input"]))


def dry_run_jobs(overrides: str | None, cwd: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(cwd),
           "-n", "--cores", "2"]
    if overrides:
        cmd += ["--config", f"overrides={overrides}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return parse_jobs(result.stdout)


if __name__ == "__main__":
    DATA.mkdir(exist_ok=True)
    for name, overrides in SCENARIOS.items():
        with tempfile.TemporaryDirectory() as tmp:
            jobs = dry_run_jobs(overrides, Path(tmp))
        (DATA / f"planned_jobs_{name}.json").write_text(json.dumps(jobs, indent=1) + "\n")
        print(name, len(jobs), "jobs")
