"""Typed config of one entry of the ``task`` group (``config/task/<name>.yaml``, selected as
``task.<name>``).

`workflow/schemas/config/task.schema.json` is generated from `TaskConfig`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, Field, StrictInt, StrictStr, model_validator
from pydantic_core import ArgsKwargs

from mechflow.config import FieldError, GroupConfig, as_mapping, config_model, parse_group
from mechflow.io import canonical_hash

Kind = Literal["ioi", "factual_recall", "greater_than", "jsonl"]
KINDS: tuple[str, ...] = get_args(Kind)
TASK_NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"

# Keys that only one kind reads, as JSON schema (the `_kind_specific_keys` check, for the schema file).
_KIND_SPECIFIC_SCHEMA = {"allOf": [
    {"if": {"properties": {"kind": {"const": "jsonl"}}, "required": ["kind"]},
     "then": {"required": ["path"], "properties": {"path": {"type": "string"}}},
     "else": {"not": {"required": ["path"]}}},
    {"if": {"properties": {"kind": {"not": {"const": "greater_than"}}}, "required": ["kind"]},
     "then": {"not": {"required": ["centuries"]}}},
]}


def _sorted_distinct(values: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(set(values)))


@config_model("task", json_schema_extra=_KIND_SPECIFIC_SCHEMA)
class TaskConfig(GroupConfig):
    """One task entry (config/task/<name>.yaml, selected as task.<name>)."""

    @classmethod
    def from_dict(cls, cfg: Any) -> TaskConfig:
        """`parse_task_config`: errors name ``task.<name>.<field>``."""
        return parse_task_config(cfg)

    name: StrictStr = Field(pattern=TASK_NAME_PATTERN, description="task name used in result paths "
                            "(results/.../{task}/): letters, digits and _.- only")
    kind: Kind = Field(description="which task builder: ioi, factual_recall, greater_than, or jsonl (your own "
                       "examples, needs `path`)")
    n_prompts: StrictInt = Field(ge=1, description="number of prompts to build (an upper bound for factual_recall "
                                 "and jsonl: fewer are used when fewer survive the per-tokenizer filters)")
    seed: StrictInt = Field(0, ge=0, description="seed of the prompt sampler")
    batch_size: StrictInt = Field(32, ge=1, description="prompts per forward pass in the baseline evaluation")
    path: StrictStr | None = Field(None, min_length=1, description="kind=jsonl only: JSONL file of examples (see "
                                   "workflow/schemas/task_example.schema.json), relative to the repository root")
    centuries: Annotated[tuple[Annotated[StrictInt, Field(ge=10, le=99)], ...], AfterValidator(_sorted_distinct)] = \
        Field((17,), min_length=1, description="kind=greater_than only: century prefixes XX of the years XXYY, "
              "e.g. [17] (Hanna et al. use 11..17)")

    @model_validator(mode="before")
    @classmethod
    def _kind_specific_keys(cls, data: Any) -> Any:
        given = data.kwargs if isinstance(data, ArgsKwargs) else data
        if not isinstance(given, dict):
            return data
        kind = given.get("kind")
        if kind == "jsonl" and not given.get("path"):
            raise FieldError("path", "is required for kind=jsonl: the JSONL file of examples "
                             "(see config/task/jsonl_example.yaml)")
        if kind != "jsonl" and "path" in given:
            raise FieldError("path", "is only used by kind=jsonl; remove it or set kind: jsonl")
        if kind != "greater_than" and "centuries" in given:
            raise FieldError("centuries", "is only used by kind=greater_than; remove it")
        return data

    def hash(self) -> str:
        """Stable hash of the settings (recorded in the dataset metadata and the baseline)."""
        return canonical_hash(asdict(self))


def parse_task_config(cfg: dict[str, Any] | TaskConfig) -> TaskConfig:
    """Check one task entry and return it typed; raise ConfigError naming `task.<name>.<field>`."""
    if isinstance(cfg, TaskConfig):
        return cfg
    cfg = as_mapping(cfg, "task")
    return parse_group(TaskConfig, cfg, f"task.{cfg.get('name', '<unnamed>')}")
