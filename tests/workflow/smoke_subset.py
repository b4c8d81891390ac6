"""Part of the smoke DAG (10 jobs: task, corpus, harvest, SAE and transcoder training and metrics, attribution,
circuit)
that the SLURM and kill/resume tests run, and how two runs' results are compared."""

from __future__ import annotations

import json
import re
from pathlib import Path

OVERRIDES = "overrides=+experiment=smoke task=[ioi]"
RUN = "results/smollm2_135m"
TARGETS = [f"{RUN}/{p}" for p in ("tasks/ioi/baseline.json", "dictionaries/sae_metrics.json",
                                  "dictionaries/transcoder_metrics.json", "attribution/ioi/agreement.json",
                                  "circuits/ioi/circuit.json")]
N_JOBS = 10
# fields that measure time, not results: dropped before JSON documents are compared
TIMING = re.compile(r"(^|_)(seconds|per_second|elapsed_s|started_at|finished_at|timestamp)$")


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
    """What differs between two runs' results: bytes, except JSON documents compared less `TIMING` fields."""
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
