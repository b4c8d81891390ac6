"""Every config group's typed config: unknown keys fail naming `<group>.<key>`, every field is
described, shipped config files parse, and compose-time errors read well."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from mechflow.config import CONFIG_GROUPS, compose_config, group_model, parse_group
from mechflow.errors import ConfigError
from mechflow.tasks.config import parse_task_config

ROOT = Path(__file__).resolve().parents[3]
# The least each group needs besides the unknown key (its required fields).
MINIMAL = {
    "model": {"name": "smollm2_135m", "dtype": "float32", "prepend_bos": True},
    "harvest": {"hooks": ["blocks.0.hook_resid_post"]},
    "task": {"name": "t", "kind": "ioi", "n_prompts": 2},
}
# Config sections nested in a group: (group, path to the section).
NESTED = [("benchmark", ("restriction",)), ("benchmark", ("acdc",)), ("reference", ("restriction",)),
          ("reference", ("positives",))]
GROUPS = sorted(set(CONFIG_GROUPS) - {"root"})  # root keys: every other key is a group


def _parse(group: str, cfg: dict):
    return parse_task_config(cfg) if group == "task" else parse_group(group_model(group), cfg)


def _config_classes():
    seen, todo = [], [group_model(g) for g in CONFIG_GROUPS]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for info in cls.__pydantic_fields__.values():
            if dataclasses.is_dataclass(info.annotation):
                todo.append(info.annotation)
    return seen


@pytest.mark.parametrize("group", GROUPS)
def test_unknown_key_names_group_and_key(group):
    with pytest.raises(ConfigError, match=rf"^{group}\.(\w+\.)?colour: unknown key; valid keys are \["):
        _parse(group, {**MINIMAL.get(group, {}), "colour": 1})


@pytest.mark.parametrize("group, path", NESTED, ids=lambda x: ".".join(x) if isinstance(x, tuple) else x)
def test_unknown_nested_key_names_its_section(group, path):
    cfg: dict = {}
    inner = cfg
    for key in path:
        inner = inner.setdefault(key, {})
    inner["colour"] = 1
    with pytest.raises(ConfigError, match=rf"^{group}\.{'.'.join(path)}\.colour: unknown key"):
        _parse(group, cfg)


def test_root_keeps_the_groups_and_rejects_a_bad_root_key():
    root = group_model("root")
    cfg = compose_config([])
    assert parse_group(root, cfg).threads == cfg["threads"]
    with pytest.raises(ConfigError, match=r"^wandb\.modus: unknown key"):
        parse_group(root, {**cfg, "wandb": {"modus": "offline"}})


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: c.__name__)
def test_every_field_is_described(cls):
    assert cls.__doc__
    for name, info in cls.__pydantic_fields__.items():
        assert info.description, f"{cls.__name__}.{name}"


def test_constructing_with_a_bad_value_is_a_config_error():
    from mechflow.circuits.config import CircuitConfig

    with pytest.raises(ConfigError, match=r"^circuits\.percentages: \[5\.0, 1\.0\] must be strictly increasing"):
        CircuitConfig(percentages=(5, 1))
    with pytest.raises(ConfigError, match=r"^circuits\.target: .*Fix it in config/circuits/"):
        CircuitConfig(target=1.5)


def test_cross_field_checks_name_the_field():
    with pytest.raises(ConfigError, match=r"^corpus\.max_tokens \(10\) must be >= corpus\.context_size \(16\)"):
        _parse("corpus", {"context_size": 16, "max_tokens": 10})
    with pytest.raises(ConfigError, match=r"^harvest\.layers and harvest\.hooks select no hook"):
        _parse("harvest", {})
    with pytest.raises(ConfigError, match=r"^attribution\.methods: \['ap'\] must include 'exact'"):
        _parse("attribution", {"methods": ["ap"]})


# Files in a group folder that are not options of the group: the report's provider-file template
# (a ProviderFile, tested in tests/unit/report/test_report.py).
NOT_OPTIONS = {ROOT / "config" / "report" / "provider.yaml"}


def _shipped(group: str) -> list[Path]:
    return sorted(p for p in (ROOT / "config" / group).glob("*.yaml") if p not in NOT_OPTIONS)


@pytest.mark.parametrize("path", [p for g in GROUPS for p in _shipped(g)], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_files_parse(path):
    group = path.parent.name
    raw = yaml.safe_load(path.read_text())
    if group == "corpus" and raw["source"] in ("text_files", "jsonl"):
        raw = {**raw, "paths": ["your/files"]}  # templates: the user names the files
    if group == "harvest" and raw.get("defaults"):
        raw = {**yaml.safe_load((ROOT / "config/harvest/default.yaml").read_text()), **raw}
    _parse(group, raw)


@pytest.mark.parametrize("experiment", ["smoke", "clt", "dictionaries"])
def test_every_group_of_an_experiment_parses(experiment):
    cfg = compose_config([f"+experiment={experiment}"])
    parse_group(group_model("root"), cfg)
    for group in GROUPS:
        for value in (cfg[group].values() if group == "task" else [cfg[group]]):
            _parse(group, value)


@pytest.mark.parametrize("override, message", [
    ("harvest.max_contexts=0", r"^harvest\.max_contexts: 0 is less than the minimum of 1\. Expected: Harvest only"),
    ("run_name=a/b", r"^run_name: 'a/b' does not match"),
    ("stats.ci_methods=[bca,normal]", r"^stats\.ci_methods\[1\]: 'normal' is not one of \['percentile', 'bca'\]"),
    ("+benchmark.acdc.tau=1", r"^benchmark\.acdc: Additional properties .*Allowed keys here: \['max_batch_rows'"),
    ("causal_tracing.window=0", r"^causal_tracing\.window: 0 is less"),
    ("model.bos_token=5", r"^model\.bos_token: 5 is not of type 'string', 'null'"),
    ("+task.ioi.centuries=[17]", r"^task\.ioi\.centuries: not used here \(kind=greater_than only"),
])
def test_compose_time_errors_name_the_field_and_what_it_expects(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_config([override])
