"""Compose, validate and name mechflow configs (Hydra compose API; never `@hydra.main`).

1. `parse_overrides` accepts what users pass through Snakemake's `--config overrides=...`:
   a YAML list of Hydra override strings or one space-separated string.
2. `expand_sweeps` turns sweep overrides (`model=a,b`, `seed=range(0,3)`) into the cartesian
   product of plain override lists, exactly as Hydra's BasicSweeper would in `--multirun`.
3. `compose_config` composes `config/config.yaml` with one override list, resolves
   interpolations and validates every group against `workflow/schemas/config/<group>.schema.json`,
   then what a schema cannot say: each group's cross-field rules (its typed config) and the sizes
   the model group states (`check_model_limits`). Every error is one line naming the field and the fix.
4. `compose_runs` does 2–3 for every sweep point and names each run folder.
5. `config_model` makes each group's typed config (`<stage>/config.py`): a frozen pydantic dataclass
   whose fields carry the defaults, bounds and descriptions. `parse_group` validates a mapping into
   it with one `ConfigError` naming `<group>.<field>` and the fix, and `config_json_schemas` generates
   the `workflow/schemas/config/*.schema.json` files that step 3 validates against.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import re
import shlex
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import ConfigDict, Field, StrictInt, StrictStr, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic.json_schema import GenerateJsonSchema

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
    except Exception as exc:  # hydra raises OverrideParseException with a readable, multi-line message
        raise ConfigError(f"cannot parse overrides {overrides!r}: {_one_line(str(exc))}; fix the override's "
                          "syntax (key=value, lists as key=[a,b]; quote values with spaces)") from exc
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


def _field_path(prefix: str, parts) -> str:
    out = prefix
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _resolve(root: dict, node: Any) -> Any:
    """`node` with a local `{"$ref": "#/$defs/X"}` replaced by its target (generated schemas use them)."""
    while isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
        target: Any = root
        for key in node["$ref"][2:].split("/"):
            target = target[key]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _describe(schema: dict, path) -> str:
    """The `description` of the property at `path` (an error's `absolute_path`), if it has one."""
    node: Any = _resolve(schema, schema)
    for part in path:
        if not isinstance(node, dict):
            return ""
        for branch in node.get("anyOf", []):  # `X | None`: follow the non-null branch
            branch = _resolve(schema, branch)
            if branch.get("type") != "null":
                node = {**branch, **{k: v for k, v in node.items() if k != "anyOf"}}
                break
        props = node.get("properties", {})
        if isinstance(part, str) and part in props:
            node = props[part]
        elif isinstance(part, int) and isinstance(node.get("items"), dict):
            node = node["items"]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return ""
        node = _resolve(schema, node)
    return node.get("description", "").rstrip(".") if isinstance(node, dict) else ""


def _most_specific(error):
    """For `anyOf` (an optional value): the error of the branch whose type the value has."""
    while error.validator in ("anyOf", "oneOf") and error.context:
        typed = [e for e in error.context if e.validator != "type"]
        if not typed:
            types = [t for e in error.context for t in ([e.validator_value] if isinstance(e.validator_value, str)
                                                        else e.validator_value)]
            error.message = f"{error.instance!r} is not of type {' or '.join(map(repr, types))}"
            return error
        error = typed[0]
    return error


def validate_group(group: str, value: Any, schema_dir: Path = DEFAULT_SCHEMA_DIR, prefix: str | None = None) -> None:
    """Validate one config group; raise ConfigError naming the field and what it accepts."""
    import jsonschema

    schema = _schema(str(schema_dir), group)
    if schema is None:
        return
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(value), key=lambda e: [str(p) for p in e.absolute_path])
    if not errors:
        return
    err = _most_specific(errors[0])
    where = _field_path(prefix if prefix is not None else group, err.absolute_path)
    forbidden = err.validator_value.get("required") if err.validator == "not" and isinstance(
        err.validator_value, dict) and set(err.validator_value) == {"required"} else None
    if forbidden:  # a key that only some values of another key use (e.g. task `path`, kind=jsonl only)
        hint = "; ".join(_describe(schema, [*err.absolute_path, k]) for k in forbidden)
        raise ConfigError(f"{_field_path(where, forbidden[:1])}: not used here" + (f" ({hint})" if hint else "")
                          + "; remove it.")
    if err.validator == "additionalProperties":
        allowed = sorted(_resolve(schema, err.schema).get("properties", {}))
        raise ConfigError(f"{where}: {err.message}. Allowed keys here: {allowed}. Fix the spelling or remove the key.")
    hint = _describe(schema, err.absolute_path)
    home = "config/config.yaml" if group == ROOT_SCHEMA else f"config/{group}/"
    raise ConfigError(f"{where}: {err.message}." + (f" Expected: {hint}." if hint else "")
                      + f" Fix it with an override, e.g. {where}=<value>, or in {home}.")


def validate_config(cfg: dict, schema_dir: Path = DEFAULT_SCHEMA_DIR) -> None:
    """Validate the root keys and every group (the `task` group: each selected task), then what a
    JSON schema cannot say: each group's cross-field checks (`validate_typed_groups`) and the limits
    the model group states (`check_model_limits`)."""
    validate_group(ROOT_SCHEMA, cfg, schema_dir, prefix="")
    known = {*RootConfig.__pydantic_fields__, *CONFIG_GROUPS, *DICTIONARY_GROUPS} - {ROOT_SCHEMA}  # type: ignore[attr-defined]
    unknown = sorted(set(cfg) - known)
    if unknown:  # the root schema lets group keys through, so it lets a misspelt root key through too
        raise ConfigError(f"{unknown[0]}: unknown key at the root of the config; valid keys are {sorted(known)}. "
                          "Fix the spelling or remove the key.")
    for group, value in cfg.items():
        if group == "task" and isinstance(value, dict):
            for name, task_cfg in value.items():
                validate_group("task", task_cfg, schema_dir, prefix=f"task.{name}")
        elif isinstance(value, dict):
            validate_group(group, value, schema_dir)
    validate_typed_groups(cfg)
    check_model_limits(cfg)


def validate_typed_groups(cfg: dict) -> None:
    """Build every group's typed config, so that its cross-field checks (e.g. `audit.base_url` is
    required when `audit.enabled`; `corpus.max_tokens` >= `corpus.context_size`) fail at composition,
    not when the stage starts. Tasks are typed by the task stage itself (`parse_task_config`)."""
    import importlib

    for group, value in cfg.items():
        if group in (ROOT_SCHEMA, "task") or not isinstance(value, dict):
            continue
        if group in CONFIG_GROUPS:
            parse_group(group_model(group), value)
        elif group in DICTIONARY_GROUPS:
            dictionaries = importlib.import_module("mechflow.dictionaries.config")
            dictionaries.parse_config(getattr(dictionaries, DICTIONARY_GROUPS[group]), value, group)


def check_model_limits(cfg: dict) -> None:
    """The sizes the model group states (`model.n_ctx`, `model.n_layers`; checked when the model
    loads) bound the corpus contexts and the harvested layers: fail here, not in the harvest."""
    model = cfg.get("model") or {}
    name, n_ctx, n_layers = model.get("name"), model.get("n_ctx"), model.get("n_layers")
    context_size = (cfg.get("corpus") or {}).get("context_size")
    if is_int(n_ctx) and is_int(context_size) and context_size > n_ctx:
        raise ConfigError(f"corpus.context_size: {context_size} tokens exceed the context of {name} (model.n_ctx = "
                          f"{n_ctx}); lower it, e.g. corpus.context_size={min(n_ctx, 128)}")
    layers = (cfg.get("harvest") or {}).get("layers") or []
    bad = [layer for layer in layers if is_int(layer) and is_int(n_layers) and layer >= n_layers]
    if bad:
        raise ConfigError(f"harvest.layers: {bad} are not layers of {name}, which has {n_layers} (0..{n_layers - 1}); "
                          f"remove them or pick layers below {n_layers}")


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
        raise ConfigError(f"cannot compose config with overrides {overrides}: {_hydra_message(exc, config_dir)}"
                          ) from exc
    finally:
        GlobalHydra.instance().clear()
    _drop_unselected_tasks(resolved)
    validate_config(resolved, schema_dir)
    return resolved


def _one_line(text: str) -> str:
    """A multi-line message (Hydra's) as one line: its lines joined with "; ", tabs and blanks dropped."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip()).rstrip(".")


def _hydra_message(exc: Exception, config_dir: Path) -> str:
    """Hydra's error as one line, without its config search path, with the options of a group that
    has no such option and the fix."""
    text = str(exc).split("Config search path:")[0]
    found = re.search(r"Could not (?:find|load) '([^'/]+)/([^']+)'", text)
    if not found:
        return _one_line(text) + "; fix the override or the YAML file it names"
    group, option = found.groups()
    options = sorted(p.stem for p in (Path(config_dir) / group).glob("*.yaml"))
    return (f"there is no option {option!r} in config group {group!r} (options: {', '.join(options)}); "
            f"use one of them, e.g. {group}={options[0] if options else '<option>'}, "
            f"or add config/{group}/{option}.yaml")


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


# ------------------------------------------------------------------------------ typed config groups

GROUP_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)
"""Every group: unknown keys fail and numbers are finite. Fields use pydantic's `Strict*` types, so
`"5"`, `2.0` or `true` is not taken for an integer, nor `"yes"` for a boolean (as the schema files)."""

JSON_SCHEMA_DRAFT = "https://json-schema.org/draft/2020-12/schema"  # jsonschema/snakemake detect the dialect
RUN_NAME_PATTERN = r"^[A-Za-z0-9_.=+-]+$"


class FieldError(ValueError):
    """Raised by a group's cross-field check to blame one field: `<where>.<field> <message>`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field, self.message = field, message


class _UniqueItems:
    """`Annotated[tuple[X, ...], UniqueItems]`: no value twice (`uniqueItems` in the schema)."""

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(_distinct, handler(source))

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict:
        return {**handler(schema), "uniqueItems": True}


def _distinct(values: tuple) -> tuple:
    if len(set(values)) != len(values):
        raise ValueError(f"{list(values)!r} lists a value twice; give each value once")
    return values


UniqueItems = _UniqueItems()


class GroupConfig:
    """What every typed config (a class made by `config_model`) can do besides holding its fields."""

    __config_where__: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, cfg: Any) -> Self:
        """Validate `cfg` (a mapping, DictConfig or None; missing keys take the class defaults)."""
        return parse_group(cls, cfg)

    def to_dict(self) -> dict:
        """The fields as plain JSON data (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def field_defaults(cls) -> dict:
        """Each field's class default as plain data (fields without a default are left out)."""
        out = {}
        for name, info in cls.__pydantic_fields__.items():  # type: ignore[attr-defined]
            if not info.is_required():
                value = info.get_default(call_default_factory=True)
                out[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return _plain(out)


def config_model(where: str, **config: Any):
    """Class decorator: a frozen pydantic dataclass for the config section `where` ("stats",
    "benchmark.restriction"); constructing one with a bad value raises `ConfigError`, as `from_dict`.

    A pydantic dataclass (not a `BaseModel`) so that `dataclasses.asdict`/`fields` keep working for
    the stages that record a config with them.
    """

    def decorate(cls):
        cls = pydantic_dataclass(frozen=True, config=ConfigDict(**{**GROUP_CONFIG, **config}))(cls)
        cls.__config_where__ = where
        validating_init = cls.__init__

        @functools.wraps(validating_init)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            try:
                validating_init(self, *args, **kwargs)
            except ValidationError as exc:
                raise config_error(exc, cls, where) from None

        cls.__init__ = __init__
        return cls

    return decorate


@lru_cache(maxsize=None)
def _adapter(model: type) -> TypeAdapter:
    return TypeAdapter(model)


def parse_group(model: type, cfg: Any, where: str | None = None) -> Any:
    """Validate `cfg` (dict, DictConfig, None or already a `model`) into `model`; raise one
    `ConfigError` naming `<where>.<field>` (default: the model's own section) and the fix."""
    where = model.__config_where__ if where is None else where
    if isinstance(cfg, model):
        return cfg
    try:
        return _adapter(model).validate_python(as_mapping(cfg, where))
    except ValidationError as exc:
        raise config_error(exc, model, where) from None


def as_mapping(cfg: Any, where: str) -> dict:
    """`cfg` (None, a mapping or an OmegaConf DictConfig) as a plain dict, without Hydra's `defaults`."""
    if cfg is None:
        return {}
    if type(cfg).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not hasattr(cfg, "keys"):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys to values, got {type(cfg).__name__}")
    return {k: v for k, v in dict(cfg).items() if k != "defaults"}  # Hydra's defaults list, in a raw YAML


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a nested config (audit.probes)
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_error(exc: ValidationError, model: type, where: str) -> ConfigError:
    """The first error of `exc` as a `ConfigError`: `<where>.<field>: what is wrong`, what the field
    expects (its description) and where to fix it."""
    err = exc.errors()[0]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):  # a shared check (e.g. check_thresholds) names the field itself
        return ConfigError(str(cause))
    loc = list(err["loc"])
    unknown = err["type"] in ("extra_forbidden", "unexpected_keyword_argument")
    parts, holder, info = _walk(model, loc[:-1] if unknown else loc)
    path = _field_path(where, parts)
    home = _home(where)
    if unknown:
        keys = sorted(getattr(holder, "__pydantic_fields__", {}))
        return ConfigError(f"{_field_path(path, [loc[-1]])}: unknown key; valid keys are {keys} "
                           f"(check {home} or the override for a typo)")
    if isinstance(cause, FieldError):
        return ConfigError(f"{_field_path(path, [cause.field])} {cause.message} (fix it in {home} or with an override)")
    if err["type"] == "missing":
        text = "is required but missing"
    elif isinstance(cause, ValueError):
        text = str(cause)
    elif err["type"] == "literal_error":
        text = f"{err['input']!r} is not one of {list(_literal_choices(info.annotation if info else None))}"
    else:
        text = f"{err['msg'][0].lower()}{err['msg'][1:]} (got {err['input']!r})"
    hint = f" Expected: {info.description.rstrip('.')}." if info is not None and info.description else ""
    key = _field_path(where, [p for p in parts if isinstance(p, str)])  # an override sets the whole list
    return ConfigError(f"{path}: {text}.{hint} Fix it in {home} or with an override, e.g. {key}=<value>.")


def _walk(model: type, loc: list) -> tuple[list, type | None, Any]:
    """`loc` of a pydantic error -> (field path, the config class it ends in, the last field's FieldInfo).

    Union branch tags and validator names in `loc` ("int", "function-after[...]") are dropped.
    """
    parts: list = []
    node: type | None = model
    info = None
    for p in loc:
        fields = getattr(node, "__pydantic_fields__", None)
        if isinstance(p, int) and fields is not None and not parts:  # a positional argument
            p = list(fields)[p]
        if isinstance(p, str) and fields is not None and p in fields:
            info = fields[p]
            parts.append(p)
            node = _config_class(info.annotation)
        elif isinstance(p, int):
            parts.append(p)
    return parts, node, info


def _config_class(annotation: Any) -> type | None:
    if hasattr(annotation, "__pydantic_fields__"):
        return annotation
    for arg in typing.get_args(annotation):
        found = _config_class(arg)
        if found is not None:
            return found
    return None


def _literal_choices(annotation: Any) -> tuple:
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        if choices := _literal_choices(arg):
            return choices
    return ()


def _home(where: str) -> str:
    group, _, rest = where.partition(".")
    if not group:
        return "config/config.yaml"
    if group == "task" and rest:
        return f"config/task/{rest.split('.')[0]}.yaml"
    return f"config/{group}/"


class _GroupSchema(GenerateJsonSchema):
    def field_title_should_be_set(self, schema) -> bool:
        return False  # the property name says it; "Batch Size" adds nothing


def group_json_schema(model: type) -> dict:
    """JSON schema of a typed config, self-contained (nested classes inlined) and compact
    (`X | None` written as `"type": [X, "null"]`), so that its validation errors read well."""
    schema = _adapter(model).json_schema(schema_generator=_GroupSchema)
    defs = schema.pop("$defs", {})
    return {"$schema": JSON_SCHEMA_DRAFT, **_sort_keys(_compact(_inline(schema, defs)))}


def _sort_keys(node: Any, parent: str = "") -> Any:
    """Keywords in alphabetical order, as pydantic writes them; properties stay in field order."""
    if isinstance(node, list):
        return node if parent in ("default", "enum", "const") else [_sort_keys(v) for v in node]
    if not isinstance(node, dict) or parent in ("default", "const"):
        return node
    keys = node if parent == "properties" else sorted(node)
    return {k: _sort_keys(node[k], k if parent != "properties" else "") for k in keys}


def _inline(node: Any, defs: dict) -> Any:
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    if not isinstance(node, dict):
        return node
    if isinstance(node.get("$ref"), str):
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return {k: _inline(v, defs) for k, v in node.items()}


def _compact(node: Any) -> Any:
    if isinstance(node, list):
        return [_compact(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _compact(v) for k, v in node.items()}
    branches = node.get("anyOf")
    if isinstance(branches, list) and len(branches) == 2 and {"type": "null"} in branches:
        other = next(b for b in branches if b != {"type": "null"})
        if isinstance(other.get("type"), str) and not {"anyOf", "oneOf", "allOf", "const"} & set(other):
            merged = {**other, "type": [other["type"], "null"]}
            if "enum" in merged:
                merged["enum"] = [*merged["enum"], None]
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            node = {**merged, **rest}
    return node


@config_model("wandb")
class WandbConfig(GroupConfig):
    """Weights & Biases logging (`mechflow.tracking`); never needs an API key."""

    mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="wandb mode; offline needs no key (the WANDB_MODE environment variable wins)")
    project: StrictStr = Field("mechflow", description="wandb project name")


@config_model("", extra="ignore")
class RootConfig(GroupConfig):
    """Root keys of `config/config.yaml`. Every other key is a config group, validated by its own
    schema (`<group>.schema.json`; the task entries by `task.schema.json`)."""

    model: dict[str, Any] = Field(description="the `model` group (config/model/)")
    corpus: dict[str, Any] = Field(description="the `corpus` group (config/corpus/)")
    harvest: dict[str, Any] = Field(description="the `harvest` group (config/harvest/)")
    task: dict[str, Any] = Field(min_length=1, description="selected tasks, e.g. task=[ioi,greater_than]")
    seed: StrictInt = Field(ge=0, description="global random seed")
    threads: StrictInt = Field(ge=1, le=256, description="torch threads per job")
    wandb: WandbConfig = Field(description="Weights & Biases logging")
    run_name: StrictStr | None = Field(None, pattern=RUN_NAME_PATTERN,
                                       description="run folder name: letters, digits and _.=+- only")


# Config group (schema file name) -> its typed config, imported lazily: this module sits below the
# stage packages. `sae`/`transcoder` come from `mechflow.dictionaries.config.json_schemas`.
CONFIG_GROUPS: dict[str, str] = {
    "analysis": "mechflow.attribution.config:AnalysisConfig",
    "attribution": "mechflow.attribution.config:AttributionConfig",
    "audit": "mechflow.audit.config:AuditConfig",
    "benchmark": "mechflow.benchmark.config:BenchmarkConfig",
    "causal_tracing": "mechflow.attribution.config:CausalTracingConfig",
    "circuits": "mechflow.circuits.config:CircuitConfig",
    "corpus": "mechflow.corpus.config:CorpusConfig",
    "feature_matching": "mechflow.features.config:FeatureMatchingConfig",
    "graph": "mechflow.graphs.config:GraphConfig",
    "features": "mechflow.features.config:FeaturesConfig",
    "harvest": "mechflow.harvest.config:HarvestConfig",
    "model": "mechflow.models.config:ModelConfig",
    "reference": "mechflow.reference.config:ReferenceConfig",
    "report": "mechflow.report.config:ReportConfig",
    "root": "mechflow.config:RootConfig",
    "stats": "mechflow.stats.config:StatsConfig",
    "steer": "mechflow.steer.config:SteerConfig",
    "summary": "mechflow.summary.config:SummaryConfig",
    "task": "mechflow.tasks.config:TaskConfig",
}
# Groups typed by `mechflow.dictionaries.config` (its own `parse_config`), not by `config_model`.
DICTIONARY_GROUPS: dict[str, str] = {"sae": "SAEConfig", "transcoder": "TranscoderConfig",
                                     "transcoder_set": "TranscoderSetConfig"}


def group_model(group: str) -> type:
    """The typed config of `group` (a key of `CONFIG_GROUPS`), imported by name: the stage configs
    import this module."""
    import importlib

    module, _, name = CONFIG_GROUPS[group].partition(":")
    return getattr(importlib.import_module(module), name)


def config_json_schemas() -> dict[str, dict]:
    """Config group name -> JSON schema generated from the group's typed config.

    `python -m mechflow.contracts.export` writes each to `workflow/schemas/config/<group>.schema.json`
    as `json.dumps(schema, indent=2) + "\n"` (compose-time validation and Snakemake's `validate`
    read those files); a test fails on drift.
    """
    import importlib

    schemas = {group: group_json_schema(group_model(group)) for group in CONFIG_GROUPS}
    schemas.update(importlib.import_module("mechflow.dictionaries.config").json_schemas())  # sae, transcoder
    return dict(sorted(schemas.items()))


def is_int(x: Any) -> bool:
    """An int that is not a bool (YAML's `true` is not a count)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
