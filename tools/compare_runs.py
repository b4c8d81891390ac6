"""Compare two run folders file by file (sha256), mapping the result paths an architecture step
renamed, and print what differs; JSON documents that differ are compared key by key.

    python tools/compare_runs.py results_before/smollm2_135m results_after/smollm2_135m

Used to check that a refactor leaves every output identical (issue 15: the smoke DAG before and
after the architecture step; see docs/results/2026-12-04-architecture-step.md). Logs, wandb and
Snakemake's per-job time tables are skipped (they hold wall times).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

# Files of rules attribute / analyze / causal_trace that moved from circuits/<task>/ to attribution/<task>/.
ATTRIBUTION_FILES = frozenset({
    "node_scores.parquet", "prompts.parquet", "head_types.parquet", "lens.parquet", "dla.parquet", "agreement.json",
    "head_patching.png", "logit_lens.png", "attribution.md", "ablations.parquet", "ablations.png", "saliency.parquet",
    "saliency.png", "neurons.parquet", "neurons.md", "analysis.md", "causal_tracing.parquet", "causal_tracing.png"})
SKIPPED = ("logs/", "wandb", "benchmarks/")


def renamed(rel: str) -> str:
    parts = rel.split("/")
    if parts[0] == "circuits" and len(parts) == 3 and parts[2] in ATTRIBUTION_FILES:
        return f"attribution/{parts[1]}/{parts[2]}"
    if parts[:2] == ["dictionaries", "sae_features"]:  # rule feature_analysis became rule features
        return "/".join(["features", *parts[2:]])
    return rel


def json_differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}: key order"] if list(a) != list(b) and set(a) == set(b) else []
        for k in sorted(set(a) | set(b), key=str):
            out += ([f"{path}.{k}: only on one side"] if k not in a or k not in b
                    else json_differences(a[k], b[k], f"{path}.{k}"))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in json_differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {str(a)[:80]} -> {str(b)[:80]}"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    same, differing, missing = 0, [], []
    for p in sorted(q for q in args.before.rglob("*") if q.is_file()):
        rel = str(p.relative_to(args.before))
        if rel.startswith(SKIPPED):
            continue
        q = args.after / renamed(rel)
        if not q.exists():
            missing.append(rel)
        elif sha256(p) == sha256(q):
            same += 1
        else:
            differing.append((rel, p, q))
    print(f"identical: {same}, different: {len(differing)}, missing after: {len(missing)}")
    for rel in missing:
        print(f"MISSING {rel}")
    for rel, p, q in differing:
        detail = ""
        if p.suffix == ".json":
            diffs = json_differences(json.loads(p.read_text()), json.loads(q.read_text()))
            detail = "; ".join(diffs[:6]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 6 else "")
        print(f"DIFF {rel}" + (f": {detail}" if detail else ""))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
