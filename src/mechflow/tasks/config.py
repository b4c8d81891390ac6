"""Typed view of one entry of the ``task`` config group (``config/task/<name>.yaml``).

The JSON schema ``workflow/schemas/config/task.schema.json`` describes the same keys; this module
re-checks them so the stage functions also fail clearly when called outside Snakemake.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mechflow.errors import ConfigError
from mechflow.io import canonical_hash

KINDS = ("ioi", "factual_recall", "greater_than", "jsonl")


@dataclass(frozen=True)
class TaskConfig:
    """One task.

    Attributes:
        name: task name, used in result paths (``results/.../{task}/``).
        kind: ``ioi`` | ``factual_recall`` | ``greater_than`` | ``jsonl``.
        n_prompts: number of examples to build (upper bound for ``factual_recall``/``jsonl``:
            fewer are used when fewer survive the per-tokenizer filters).
        seed: seed of the example sampler.
        batch_size: prompts per forward pass in the baseline evaluation.
        path: JSONL file of user examples (``jsonl`` only; relative to the working directory).
        centuries: ``greater_than`` only: the century prefixes XX of the years XXYY (Hanna et al.
            use 11..17).
    """

    name: str
    kind: str
    n_prompts: int
    seed: int = 0
    batch_size: int = 32
    path: str | None = None
    centuries: tuple[int, ...] = field(default=(17,))

    def hash(self) -> str:
        """Stable hash of the settings (recorded in the dataset metadata and the baseline)."""
        return canonical_hash(asdict(self))


def _int(cfg: dict, key: str, where: str, minimum: int) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}.{key}={value!r} must be an integer >= {minimum}")
    return value


def parse_task_config(cfg: dict[str, Any] | TaskConfig) -> TaskConfig:
    """Check one task entry and return it typed; raise ConfigError naming the bad field."""
    if isinstance(cfg, TaskConfig):
        return cfg
    if hasattr(cfg, "items") and not isinstance(cfg, dict):  # OmegaConf DictConfig
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, dict):
        raise ConfigError(f"a task entry must be a mapping, got {type(cfg).__name__}")
    where = f"task.{cfg.get('name', '<unnamed>')}"
    allowed = set(TaskConfig.__dataclass_fields__)
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}")
    for key in ("name", "kind", "n_prompts"):
        if cfg.get(key) is None:
            raise ConfigError(f"{where}.{key} is missing; see config/task/ioi.yaml for an example")
    if not isinstance(cfg["name"], str) or not cfg["name"]:
        raise ConfigError(f"{where}.name must be a non-empty string")
    if cfg["kind"] not in KINDS:
        raise ConfigError(f"{where}.kind={cfg['kind']!r} must be one of {list(KINDS)}")
    out: dict[str, Any] = {"name": cfg["name"], "kind": cfg["kind"], "n_prompts": _int(cfg, "n_prompts", where, 1)}
    if cfg.get("seed") is not None:
        out["seed"] = _int(cfg, "seed", where, 0)
    if cfg.get("batch_size") is not None:
        out["batch_size"] = _int(cfg, "batch_size", where, 1)
    if cfg["kind"] == "jsonl":
        if not isinstance(cfg.get("path"), str) or not cfg["path"]:
            raise ConfigError(f"{where}.path is required for kind=jsonl: the JSONL file of examples "
                              "(see config/task/jsonl_example.yaml)")
        out["path"] = cfg["path"]
    elif cfg.get("path") is not None:
        raise ConfigError(f"{where}.path is only used by kind=jsonl; remove it or set kind: jsonl")
    if cfg.get("centuries") is not None:
        cents = cfg["centuries"]
        if cfg["kind"] != "greater_than":
            raise ConfigError(f"{where}.centuries is only used by kind=greater_than; remove it")
        if (not isinstance(cents, (list, tuple)) or not cents
                or any(isinstance(c, bool) or not isinstance(c, int) or not 10 <= c <= 99 for c in cents)):
            raise ConfigError(f"{where}.centuries={cents!r} must be a non-empty list of two-digit integers, e.g. [17]")
        out["centuries"] = tuple(sorted(set(cents)))
    return TaskConfig(**out)
