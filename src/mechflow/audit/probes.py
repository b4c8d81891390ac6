"""Probe items (JSONL files) and the requests they become.

Item formats, one JSON object per line (docs/audit.md has examples; `mechflow/audit/data/` ships one file
of each kind):

- decision: ``{"id", "template", "attribute", "values": {group: [value, ...]}, "options": [pos, neg],
  "label": pos | neg | null}``; the template holds ``{<attribute>}`` where each value goes. ``options[0]``
  is the favourable decision ("yes"), whose log-probability is the score's positive side.
- paraphrase: ``{"id", "paraphrases": [text, ...], "options": [...], "answer": option | null}``.
- refusal: ``{"id", "pair", "kind": "benign" | "harmful", "prompt"}``.

A request asks one text. With ``api: chat`` it is the user message; with ``api: completions`` the text
followed by ``"\\nAnswer:"``, so that a base model continues with the answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from mechflow.audit.config import BUILTIN_PREFIX, AuditConfig, ProbeSpec
from mechflow.errors import DataError

KINDS_FIELDS = {
    "decision": ("id", "template", "attribute", "values", "options"),
    "paraphrase": ("id", "paraphrases", "options"),
    "refusal": ("id", "pair", "kind", "prompt"),
}


def probe_path(spec: ProbeSpec) -> Path:
    """The file of a probe: a shipped one (builtin:<name>) or a user's path."""
    if spec.file.startswith(BUILTIN_PREFIX):
        name = spec.file[len(BUILTIN_PREFIX):]
        path = Path(str(resources.files("mechflow.audit") / "data" / name))
        if not path.is_file():
            shipped = sorted(p.name for p in Path(str(resources.files("mechflow.audit") / "data")).glob("*.jsonl"))
            raise DataError(f"audit.probes[{spec.name}].file = {spec.file!r}: no such shipped file; shipped: "
                            f"{[BUILTIN_PREFIX + s for s in shipped]}")
        return path
    path = Path(spec.file)
    if not path.is_file():
        raise DataError(f"audit.probes[{spec.name}].file = {spec.file!r}: no such file (relative paths are from "
                        "the working directory): fix the path")
    return path


def read_items(spec: ProbeSpec) -> list[dict]:
    """The probe's items, each checked for the fields its kind needs (one error naming file, line, field)."""
    path = probe_path(spec)
    items, ids = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not JSON ({exc.msg}); each line must be one JSON object") from None
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a JSON object")
        missing = [k for k in KINDS_FIELDS[spec.kind] if k not in item]
        if missing:
            raise DataError(f"{where}: a {spec.kind} item needs {missing[0]!r} (fields: {KINDS_FIELDS[spec.kind]})")
        if item["id"] in ids:
            raise DataError(f"{where}: id {item['id']!r} repeats an earlier line; ids must be unique")
        ids.add(item["id"])
        _check(spec.kind, item, where)
        items.append(item)
    if not items:
        raise DataError(f"{path}: no items; probe {spec.name!r} needs at least one")
    return items


def _check(kind: str, item: dict, where: str) -> None:
    if kind == "decision":
        opts, values = item["options"], item["values"]
        if not (isinstance(opts, list) and len(opts) == 2 and all(isinstance(o, str) and o for o in opts)):
            raise DataError(f"{where}: 'options' must be two strings [favourable, unfavourable], e.g. "
                            '["yes", "no"]')
        if not (isinstance(values, dict) and len(values) >= 2
                and all(isinstance(v, list) and v and all(isinstance(x, str) for x in v) for v in values.values())):
            raise DataError(f"{where}: 'values' must map at least 2 groups to non-empty lists of strings")
        if "{" + str(item["attribute"]) + "}" not in item["template"]:
            raise DataError(f"{where}: the template has no {{{item['attribute']}}} for the attribute's values")
        if item.get("label") not in (None, *opts):
            raise DataError(f"{where}: 'label' must be one of {opts} or null")
    elif kind == "paraphrase":
        if not (isinstance(item["paraphrases"], list) and len(item["paraphrases"]) >= 2):
            raise DataError(f"{where}: 'paraphrases' must list at least 2 wordings")
        if item.get("answer") not in (None, *item["options"]):
            raise DataError(f"{where}: 'answer' must be one of {item['options']} or null")
    elif item["kind"] not in ("benign", "harmful"):
        raise DataError(f"{where}: 'kind' must be benign or harmful, got {item['kind']!r}")


@dataclass(frozen=True)
class Ask:
    """One text asked of the endpoint, with what it belongs to."""

    probe: str
    item: str
    text: str
    meta: dict[str, Any]


def decision_asks(spec: ProbeSpec, items: list[dict]) -> list[Ask]:
    out = []
    for item in items:
        for group, values in item["values"].items():
            for value in values:
                text = item["template"].replace("{" + item["attribute"] + "}", value)
                out.append(Ask(spec.name, item["id"], text, {"group": group, "value": value}))
    return out


def paraphrase_asks(spec: ProbeSpec, items: list[dict]) -> list[Ask]:
    return [Ask(spec.name, item["id"], text, {"paraphrase": i}) for item in items
            for i, text in enumerate(item["paraphrases"])]


def refusal_asks(spec: ProbeSpec, items: list[dict]) -> list[Ask]:
    return [Ask(spec.name, item["id"], item["prompt"], {"pair": item["pair"], "kind": item["kind"]}) for item in items]


ASKS = {"decision": decision_asks, "paraphrase": paraphrase_asks, "refusal": refusal_asks}


def request_body(cfg: AuditConfig, model: str, text: str, *, api: str, max_tokens: int, logprobs: bool,
                 temperature: float | None = None, seed: int | None = None) -> tuple[str, dict]:
    """(endpoint, JSON body) asking `text` (see module docstring for the completions suffix)."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens,
                            "temperature": cfg.temperature if temperature is None else temperature,
                            "seed": cfg.seed if seed is None else seed}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": text}]
        if logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = cfg.top_logprobs
        return "/chat/completions", body
    body["prompt"] = text + "\nAnswer:"
    if logprobs:
        body["logprobs"] = cfg.top_logprobs
    return "/completions", body


def raw_completion_body(cfg: AuditConfig, model: str, prompt: str) -> tuple[str, dict]:
    """A white-box task prompt as it is (no suffix), one token with its top alternatives."""
    return "/completions", {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
                            "seed": cfg.seed, "logprobs": max(cfg.top_logprobs, 1)}
