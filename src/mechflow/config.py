"""Compose, validate and name mechflow configs (Hydra compose API; never `@hydra.main`).

1. `parse_overrides` accepts what users pass through Snakemake's `--config overrides=...`:
   a YAML list of Hydra override strings or one space-separated string.
2. `expand_sweeps` turns sweep overrides (`model=a,b`, `seed=range(0,3)`) into the cartesian
   product of plain override lists, exactly as Hydra's BasicSweeper would in `--multirun`.
3. `compose_config` composes `config/config.yaml` with one override list, resolves
   interpolations and validates every group against `workflow/schemas/config/<group>.schema.json`.
4. `compose_runs` does 2–3 for every sweep point and names each run folder.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from mechflow.errors import ConfigError
from mechflow.io import canonical_hash

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG_DIR = REPO_ROOT / "config"
DEFAULT_SCHEMA_DIR = REPO_ROOT / "workflow" / "schemas" / "config"
ROOT_SCHEMA = "root"
_RUN_NAME_BAD = re.compile(r"[^A-Za-z0-9_.=+-]+")


def parse_overrides(value: Any) -> list[str]:
    """Normalise `--config overrides=...` (None, a string, or a list of strings) to a list."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                import yaml

                parsed = yaml.safe_load(text)
            return parse_overrides(parsed)
        return shlex.split(text)
    if isinstance(value, (list, tuple)):
        bad = [v for v in value if not isinstance(v, str)]
        if bad:
            raise ConfigError(
                f"overrides must be strings like 'harvest.layers=[3,6]', got {bad!r}; quote each one, "
                "e.g. --config overrides='[\"model=gemma3_270m\"]'"
            )
        return list(value)
    raise ConfigError(f"overrides must be a list of Hydra override strings, got {type(value).__name__}")


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """Cartesian product of sweep overrides; non-sweep overrides are kept in every combination."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except Exception as exc:  # hydra raises OverrideParseException with a readable message
        raise ConfigError(f"cannot parse overrides {overrides!r}: {exc}") from exc
    axes: list[list[str]] = []
    for override, text in zip(parsed, overrides):
        if override.is_sweep_override():
            key = override.get_key_element()
            axes.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            axes.append([text])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


@lru_cache(maxsize=64)
def _schema(schema_dir: str, group: str) -> dict | None:
    path = Path(schema_dir) / f"{group}.schema.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _field_path(prefix: str, error) -> str:
    parts = [prefix, *[str(p) for p in error.absolute_path]]
    return ".".join(p for p in parts if p)


def _describe(schema: dict, error) -> str:
    """The `description` of the failing property, if the schema has one."""
    node = schema
    for part in error.absolute_path:
        props = node.get("properties", {}) if isinstance(node, dict) else {}
        if isinstance(part, str) and part in props:
            node = props[part]
        elif isinstance(node, dict) and "additionalProperties" in node and isinstance(node["additionalProperties"], dict):
            node = node["additionalProperties"]
        else:
            return ""
    return node.get("description", "") if isinstance(node, dict) else ""


def validate_group(group: str, value: Any, schema_dir: Path = DEFAULT_SCHEMA_DIR, prefix: str | None = None) -> None:
    """Validate one config group; raise ConfigError naming the field and what it accepts."""
    import jsonschema

    schema = _schema(str(schema_dir), group)
    if schema is None:
        return
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    err = errors[0]
    where = _field_path(prefix if prefix is not None else group, err)
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        raise ConfigError(f"{where}: {err.message}. Allowed keys here: {allowed}. Fix the spelling or remove the key.")
    hint = _describe(schema, err)
    home = "config/config.yaml" if group == ROOT_SCHEMA else f"config/{group}/"
    raise ConfigError(f"{where}: {err.message}." + (f" Expected: {hint}." if hint else "")
                      + f" Fix it with an override, e.g. {where}=<value>, or in {home}.")


def validate_config(cfg: dict, schema_dir: Path = DEFAULT_SCHEMA_DIR) -> None:
    """Validate the root keys and every group (the `task` group: each selected task)."""
    validate_group(ROOT_SCHEMA, cfg, schema_dir, prefix="")
    for group, value in cfg.items():
        if group == "task" and isinstance(value, dict):
            for name, task_cfg in value.items():
                validate_group("task", task_cfg, schema_dir, prefix=f"task.{name}")
        elif isinstance(value, dict):
            validate_group(group, value, schema_dir)


def compose_config(overrides: list[str] | None = None, config_dir: Path = DEFAULT_CONFIG_DIR,
                   schema_dir: Path = DEFAULT_SCHEMA_DIR) -> dict:
    """Compose `config.yaml` with Hydra overrides; return the resolved, validated plain dict."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides or [])
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"cannot compose config with overrides {overrides}: {exc}".strip()) from exc
    finally:
        GlobalHydra.instance().clear()
    _drop_unselected_tasks(resolved)
    validate_config(resolved, schema_dir)
    return resolved


def _drop_unselected_tasks(cfg: dict) -> None:
    """Remove `task.<name>` entries that only an experiment's size overrides created.

    An experiment (e.g. `+experiment=smoke`) may set `task.factual_recall.n_prompts` for every task
    it knows; when the user selects fewer tasks (`task=[ioi]`), that leaves an entry without `kind`
    (no task config file was selected for it). Such an entry is not a task: drop it.
    """
    tasks = cfg.get("task")
    if isinstance(tasks, dict):
        for name in [n for n, t in tasks.items() if isinstance(t, dict) and "kind" not in t and "name" not in t]:
            del tasks[name]


def config_hash(cfg: dict) -> str:
    """Short, stable hash of a resolved config (or of one group)."""
    return canonical_hash(cfg)[:16]


@dataclass(frozen=True)
class Run:
    """One sweep point: its folder name, the overrides that made it and its resolved config."""

    name: str
    overrides: tuple[str, ...]
    cfg: dict = field(hash=False, compare=False)

    @property
    def hash(self) -> str:
        return config_hash(self.cfg)

    def stage(self, group: str) -> dict:
        return self.cfg[group]


def run_name_for(cfg: dict, sweep_overrides: list[str]) -> str:
    if cfg.get("run_name"):
        return str(cfg["run_name"])
    parts = [cfg["model"]["name"]]
    parts += [o for o in sweep_overrides if not o.startswith("model=")]
    return _RUN_NAME_BAD.sub("_", "__".join(parts))


def compose_runs(overrides: Any = None, config_dir: Path = DEFAULT_CONFIG_DIR,
                 schema_dir: Path = DEFAULT_SCHEMA_DIR) -> dict[str, Run]:
    """Every sweep point of `overrides`, composed and validated, keyed by run folder name."""
    base = parse_overrides(overrides)
    sweep_keys = {o.split("=", 1)[0] for o in base if "=" in o and _is_sweep(o)}
    runs: dict[str, Run] = {}
    for combo in expand_sweeps(base):
        cfg = compose_config(combo, config_dir, schema_dir)
        swept = [o for o in combo if o.split("=", 1)[0] in sweep_keys]
        name = run_name_for(cfg, swept)
        if name in runs:
            raise ConfigError(
                f"two sweep points map to the run folder {name!r} ({list(runs[name].overrides)} and {combo}); "
                "remove `run_name` from the overrides when sweeping"
            )
        runs[name] = Run(name=name, overrides=tuple(combo), cfg=cfg)
    return runs


def _is_sweep(override: str) -> bool:
    return len(expand_sweeps([override])) > 1


def config_json_schemas() -> dict[str, dict]:
    """Config group name -> JSON schema generated from the group's pydantic model.

    `python -m mechflow.contracts.export` writes each to `workflow/schemas/config/<group>.schema.json`
    (compose-time validation and Snakemake's `validate` read those files); a test fails on drift.
    Groups are imported lazily: this module sits below the stage packages.
    """
    from mechflow.dictionaries.config import json_schemas

    return dict(json_schemas())
