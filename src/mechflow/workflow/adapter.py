"""The adapter between a rule's `script:` and a stage function: `run_rule(snakemake, stage_function)`.

Every script in `workflow/scripts/` is three lines. `run_rule` passes the job's named inputs,
outputs, params and wildcards as keyword arguments (a stage function names what it needs), pins
torch threads, logs to the rule's log file, opens one wandb run per job and turns mechflow errors
into one clear message.
"""

from __future__ import annotations

import inspect
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

from mechflow.errors import MechflowError
from mechflow.tracking import stage_run
from mechflow.workflow.runs import RUNS

log = logging.getLogger(__name__)


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


def typed_config(value: Any, annotation: Any) -> Any:
    """A resolved config group (dict) as the typed config the stage function's annotation names.

    A class with a ``from_dict`` classmethod (every config model keeps one: it validates once and
    raises the ConfigError that names ``<group>.<key>`` and the fix) or any pydantic model; other
    annotations and values that are not mappings pass through unchanged.
    """
    if not isinstance(value, dict):
        return value
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)  # `CircuitConfig | Mapping[str, Any]`: the config model is the first member
    for member in members:
        if isinstance(member, type) and callable(getattr(member, "from_dict", None)):
            return member.from_dict(value)
        if isinstance(member, type) and callable(getattr(member, "model_validate", None)):
            return member.model_validate(value)
    return value


def call_with_named(fn: Callable, available: dict[str, Any]) -> Any:
    """Call `fn` with the entries of `available` that its signature names (error if one is missing).

    Parameters annotated with a config model receive it typed (`typed_config`), so a stage reads
    ``def circuit(cfg: CircuitConfig, *, ...)`` while its rule passes ``params: cfg=stage_cfg("circuit")``.
    """
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve at run time: pass values as they are
        hints = {}
    kwargs, missing = {}, []
    for name, param in sig.parameters.items():
        if name in available:
            kwargs[name] = typed_config(available[name], hints.get(name))
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


def remove_stale_temp_files(outputs: Any) -> list[Path]:
    """Delete the temp files a killed job left beside its outputs (`mechflow.io.atomic_path` names them
    ``.<name>.<random>.tmp``; inside a directory output, any ``.*.tmp``). Snakemake removes a killed
    job's declared outputs before it reruns it, but cannot know these."""
    removed = []
    for out in outputs:
        path = Path(out)
        stale = path.rglob(".*.tmp") if path.is_dir() else path.parent.glob(f".{path.name}.*.tmp")
        for tmp in stale:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    if removed:
        log.info("removed %d temp file(s) of an interrupted earlier try: %s", len(removed), removed[:5])
    return removed


def run_rule(smk: Any, fn: Callable) -> Any:
    """Run a stage function from a Snakemake `script:` with the job's named inputs/outputs/params.

    Sets up logging to the rule's log file, pins torch threads to the rule's `threads`, keeps wandb
    offline unless configured otherwise (each job is one wandb run in `results/<run>/wandb/`, grouped
    by run, logging the stage's numeric summary), and turns mechflow errors into one clear message.
    """
    _configure_logging(smk.log[0] if len(smk.log) else None)
    import torch

    torch.set_num_threads(max(1, int(smk.threads)))
    remove_stale_temp_files(smk.output)
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
