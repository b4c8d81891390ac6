"""Task config parsing, the shipped config files and task.schema.json."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml
from task_helpers import REPO

from mechflow.errors import ConfigError
from mechflow.tasks import parse_task_config

SCHEMA = json.loads((REPO / "workflow" / "schemas" / "config" / "task.schema.json").read_text())
CONFIGS = sorted((REPO / "config" / "task").glob("*.yaml"))


def test_every_schema_property_has_a_description():
    assert SCHEMA["additionalProperties"] is False
    for key, prop in SCHEMA["properties"].items():
        assert prop.get("description"), key


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate_and_parse(path):
    text = path.read_text()
    assert text.splitlines()[0] == f"# @package task.{path.stem}"
    cfg = yaml.safe_load(text)
    jsonschema.validate(cfg, SCHEMA)
    task = parse_task_config(cfg)
    assert task.name == path.stem


def test_all_four_kinds_are_shipped():
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in CONFIGS}
    assert kinds == {"ioi", "factual_recall", "greater_than", "jsonl"}


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        ({"name": "t", "kind": "ioi", "n_prompts": 8, "seed": 0, "colour": 1}, "colour"),
        ({"name": "t", "kind": "jsonl", "n_prompts": 8, "seed": 0}, "path"),
        ({"name": "t", "kind": "ioi", "n_prompts": 8, "seed": 0, "path": "x.jsonl"}, "path"),
        ({"name": "t", "kind": "ioi", "n_prompts": 8, "seed": 0, "centuries": [17]}, "centuries"),
        ({"name": "t", "kind": "greater_than", "n_prompts": 8, "seed": 0, "centuries": [7]}, "centuries"),
        ({"name": "t", "kind": "riddles", "n_prompts": 8, "seed": 0}, "kind"),
        ({"name": "t", "kind": "ioi", "n_prompts": 0, "seed": 0}, "n_prompts"),
        ({"name": "t", "kind": "jsonl", "n_prompts": 8, "path": None}, "path"),
        ({"name": "a b", "kind": "ioi", "n_prompts": 8}, "name"),
        ({"name": "t", "kind": "ioi"}, r"task\.t\.n_prompts"),
    ],
)
def test_bad_entries_fail_in_schema_and_parser_naming_the_field(cfg, field):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, SCHEMA)
    with pytest.raises(ConfigError, match=field):
        parse_task_config(cfg)


def test_centuries_are_sorted_and_distinct():
    cfg = {"name": "gt", "kind": "greater_than", "n_prompts": 9, "centuries": [17, 11, 17]}
    assert parse_task_config(cfg).centuries == (11, 17)


def test_config_hash_tracks_settings():
    base = {"name": "t", "kind": "ioi", "n_prompts": 8, "seed": 0}
    assert parse_task_config(base).hash() == parse_task_config(dict(base)).hash()
    assert parse_task_config(base).hash() != parse_task_config({**base, "seed": 1}).hash()
