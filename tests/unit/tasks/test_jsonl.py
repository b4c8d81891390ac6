"""User JSONL tasks: the shipped example, the schema, and one clear DataError per bad input."""

from __future__ import annotations

import json

import jsonschema
import pytest
from task_helpers import REPO

from mechflow.contracts.models import TaskExample
from mechflow.errors import DataError
from mechflow.tasks import parse_task_config
from mechflow.tasks.jsonl import build_jsonl

SCHEMA = json.loads((REPO / "workflow" / "schemas" / "task_example.schema.json").read_text())
EXAMPLE = REPO / "config" / "task" / "data" / "example.jsonl"
GOOD = {"prompt": "The capital of France is the city of", "corrupted_prompt": "The capital of Italy is the city of",
        "answer": " Paris", "wrong_answer": " Rome"}


def _cfg(path):
    return parse_task_config({"name": "mine", "kind": "jsonl", "n_prompts": 100, "seed": 0, "path": str(path)})


def _write(tmp_path, lines):
    path = tmp_path / "ex.jsonl"
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_shipped_example_builds_and_matches_the_schema(smol_tok):
    lines = [json.loads(ln) for ln in EXAMPLE.read_text().splitlines() if ln.strip()]
    for obj in lines:
        jsonschema.validate(obj, SCHEMA)
        TaskExample(**obj)
    built = build_jsonl(_cfg(EXAMPLE), smol_tok)
    assert len(built.items) == len(lines) and built.metric == "logit_diff"
    assert [it.id for it in built.items] == [obj["id"] for obj in lines]


def test_schema_and_pydantic_contract_agree():
    model = TaskExample.model_json_schema()
    assert set(SCHEMA["properties"]) == set(model["properties"])
    assert set(SCHEMA["required"]) == set(model["required"])
    assert SCHEMA["additionalProperties"] is model["additionalProperties"] is False
    for key, prop in SCHEMA["properties"].items():
        assert prop.get("description"), key
        assert {k: v for k, v in prop.items() if k not in ("description", "title")} == \
            {k: v for k, v in model["properties"][key].items() if k not in ("description", "title")}, key
    bad = {**GOOD, "extra": 1}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)
    with pytest.raises(ValueError):
        TaskExample(**bad)


def test_ids_default_to_line_numbers_and_blank_lines_are_skipped(tmp_path, smol_tok):
    built = build_jsonl(_cfg(_write(tmp_path, [GOOD, "", GOOD])), smol_tok)
    assert [it.id for it in built.items] == [1, 3]


def test_multi_token_answer_names_line_and_token_count(tmp_path, smol_tok):
    n_tokens = len(smol_tok.raw(" Buenos Aires"))
    assert n_tokens > 1
    path = _write(tmp_path, [GOOD, {**GOOD, "answer": " Buenos Aires"}])
    with pytest.raises(DataError, match=rf"line 2: answer ' Buenos Aires' is {n_tokens} tokens") as err:
        build_jsonl(_cfg(path), smol_tok)
    assert str(path) in str(err.value) and "1 line(s)" in str(err.value)


def test_mismatched_lengths_name_line_and_both_lengths(tmp_path, smol_tok):
    corrupted = "The capital of the United Kingdom is the city of"
    a, b = len(smol_tok.encode(GOOD["prompt"])), len(smol_tok.encode(corrupted))
    assert a != b
    path = _write(tmp_path, [GOOD, GOOD, {**GOOD, "corrupted_prompt": corrupted}])
    with pytest.raises(DataError, match=rf"line 3: prompt has {a} tokens, corrupted_prompt {b}"):
        build_jsonl(_cfg(path), smol_tok)


def test_empty_file(tmp_path, smol_tok):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(DataError, match="no examples"):
        build_jsonl(_cfg(path), smol_tok)


def test_bad_json_line_is_reported_with_its_number(tmp_path, smol_tok):
    path = _write(tmp_path, [GOOD, GOOD, '{"prompt": "x", oops}'])
    with pytest.raises(DataError, match=r"ex\.jsonl:3: invalid JSON"):
        build_jsonl(_cfg(path), smol_tok)


def test_missing_field_and_identical_answers(tmp_path, smol_tok):
    no_wrong = {k: v for k, v in GOOD.items() if k != "wrong_answer"}
    with pytest.raises(DataError, match=r":2: not a task example \(wrong_answer: Field required"):
        build_jsonl(_cfg(_write(tmp_path, [GOOD, no_wrong])), smol_tok)
    with pytest.raises(DataError, match="line 1: answer ' Paris' and wrong_answer ' Paris'"):
        build_jsonl(_cfg(_write(tmp_path, [{**GOOD, "wrong_answer": " Paris"}])), smol_tok)


def test_duplicate_ids(tmp_path, smol_tok):
    with pytest.raises(DataError, match="id 'a' appears twice"):
        build_jsonl(_cfg(_write(tmp_path, [{**GOOD, "id": "a"}, {**GOOD, "id": "a"}])), smol_tok)
