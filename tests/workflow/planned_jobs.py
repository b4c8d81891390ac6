"""Parse a Snakemake dry run into its job set: one (rule, inputs, outputs) record per job.

`tests/workflow/data/planned_jobs_*.json` hold the job sets planned BEFORE the architecture step
of issue 15 (commit a98f9c2). `test_dag.py::test_dry_run_plans_the_recorded_job_set` maps them
through `renamed` (the rule and result-path renames CHANGELOG.md lists, and `ADDED_OUTPUTS`: files a
stage always wrote that its rule now declares) and fails unless the DAG plans exactly those jobs: a
refactor may rename, never add, drop or rewire a job. Stages added by later issues are listed in
`NEW_RULES` (their jobs are checked separately) and the inputs they added in `later_additions`.
"""

from __future__ import annotations

import json
import os
import re
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


# Renames of the architecture step (CHANGELOG.md, "Result paths renamed").
RENAMED_RULES = {"circuit": "circuits", "statistics": "stats", "feature_analysis": "features"}
# Files of rules attribute / analyze / causal_trace moved from circuits/{task}/ to attribution/{task}/.
ATTRIBUTION_FILES = frozenset({
    "node_scores.parquet", "prompts.parquet", "head_types.parquet", "lens.parquet", "dla.parquet", "agreement.json",
    "head_patching.png", "logit_lens.png", "attribution.md", "ablations.parquet", "ablations.png", "saliency.parquet",
    "saliency.png", "neurons.parquet", "neurons.md", "analysis.md", "causal_tracing.parquet", "causal_tracing.png"})


# Files a stage wrote beside its declared outputs before the architecture step, now declared by its
# rule ("a stage writes exactly the paths its rule declares"; CHANGELOG.md): rule (after the renames)
# -> file names, in the folder of the job's other outputs. The files themselves are unchanged.
ADDED_OUTPUTS = {
    "stats": ("bootstrap.csv", "stability_methods.csv", "tau_heatmap.png"),
    "cross_model": ("fcas_null.png", "cka.json", "cka.parquet", "cka.csv", "cka.png"),
    "train_sae": ("training_curves.png",),  # issue 17: every figure a declared report() output
    "train_transcoder": ("training_curves.png",),
}


# Jobs and inputs added by later issues (each a new stage, not a refactor): rule -> issue.
NEW_RULES = {"report": "issue 17: the Annex IV report ends every run",
             "paper_figures": "issue 17: the paper figures and tables the report embeds (snakemake figures)",
             "rulegraph": "issue 17: the rule graph of the report's reproducibility appendix",
             "steer": "issue 18: steering sweeps of steer.tasks (ioi, factual_recall), recorded by run_manifest"}
# issue 18: run_manifest records the steer outputs of each task of steer.tasks the run has.
STEER_TASKS = ("factual_recall", "ioi")
STEER_OUTPUTS = ("summary.json", "interventions.jsonl", "activations.jsonl", "directions.safetensors",
                 "layers.png", "sweep.png", "generations.md")
# Files run_manifest now records because the report cites them (issue 17), by the recorded input they
# sit beside: recorded file name -> added file names in the same folder.
MANIFEST_ADDED_INPUTS = {"bootstrap.parquet": ("stability.json", "forest.png", "tau_heatmap.png"),
                         "circuit.json": ("circuit.png",),
                         "node_scores.parquet": ("head_patching.png", "logit_lens.png"),
                         "sae_metrics.json": ("sae/training_curves.png",),
                         "transcoder_metrics.json": ("transcoder/training_curves.png",)}


def later_additions(job: dict) -> dict:
    """A recorded job with the inputs later issues added (`MANIFEST_ADDED_INPUTS`, `NEW_RULES` outputs
    that rule `all` now asks for)."""
    inputs = list(job["input"])
    if job["rule"] == "run_manifest":
        for path in job["input"]:
            folder, _, name = path.rpartition("/")
            inputs += [f"{folder}/{added}" for added in MANIFEST_ADDED_INPUTS.get(name, ())]
            m = re.match(r"(results/[^/]+)/tasks/([^/]+)/dataset.jsonl$", path)
            if m and m.group(2) in STEER_TASKS:
                inputs += [f"{m.group(1)}/steer/{m.group(2)}/{out}" for out in STEER_OUTPUTS]
    if job["rule"] == "all":
        inputs += [p.replace("run_manifest.json", "report/report.pdf") for p in job["input"]
                   if p.endswith("/run_manifest.json")]
    return {**job, "input": sorted(inputs)}


def renamed_path(path: str) -> str:
    m = re.match(r"(results/[^/]+)/circuits/([^/]+)/(.+)$", path)
    if m and m.group(3) in ATTRIBUTION_FILES:
        return f"{m.group(1)}/attribution/{m.group(2)}/{m.group(3)}"
    m = re.match(r"(results/[^/]+)/dictionaries/sae_features/(.+)$", path)  # rule features' folder
    if m:
        return f"{m.group(1)}/features/{m.group(2)}"
    return path


def added_outputs(rule: str, outputs: list[str]) -> list[str]:
    """The `ADDED_OUTPUTS` of `rule`, in the one folder of the job's recorded outputs."""
    names = ADDED_OUTPUTS.get(rule, ())
    if not names:
        return []
    folders = {p.rsplit("/", 1)[0] for p in outputs}
    if len(folders) != 1:
        raise ValueError(f"rule {rule}: outputs in {len(folders)} folders ({sorted(folders)}); expected one")
    (folder,) = folders
    return [f"{folder}/{name}" for name in names]


def renamed(jobs: list[dict]) -> list[dict]:
    """A recorded job set with the architecture step's renames and added outputs applied."""
    out = []
    for j in jobs:
        rule = RENAMED_RULES.get(j["rule"], j["rule"])
        outputs = [renamed_path(p) for p in j["output"]]
        out.append(later_additions({"rule": rule, "input": sorted(renamed_path(p) for p in j["input"]),
                                    "output": sorted(outputs + added_outputs(rule, outputs))}))
    # issue 17: a run's manifest records the FCAS / CKA of the model pairs it belongs to (its report cites them)
    compared = [p for j in out if j["rule"] == "cross_model" for p in j["output"]
                if p.endswith(("fcas.json", "fcas_null.png", "cka.json", "cka.png"))]
    for j in out:
        if j["rule"] == "run_manifest":
            run = j["output"][0].split("/")[1]
            j["input"] = sorted(j["input"] + [p for p in compared if run in p.split("/")[2].split("__vs__")])
    return sorted(out, key=lambda j: (j["rule"], j["output"], j["input"]))


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


if __name__ == "__main__":  # re-record: only at the commit the docstring names (git worktree add ... a98f9c2)
    DATA.mkdir(exist_ok=True)
    for name, overrides in SCENARIOS.items():
        with tempfile.TemporaryDirectory() as tmp:
            jobs = dry_run_jobs(overrides, Path(tmp))
        (DATA / f"planned_jobs_{name}.json").write_text(json.dumps(jobs, indent=1) + "\n")
        print(name, len(jobs), "jobs")
