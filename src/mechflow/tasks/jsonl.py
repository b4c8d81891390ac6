"""User task examples from a JSONL file (schema: ``workflow/schemas/task_example.schema.json``).

One JSON object per line with ``prompt``, ``corrupted_prompt``, ``answer``, ``wrong_answer`` and
optionally ``id`` and ``template`` (:class:`~mechflow.contracts.tasks.TaskExample`). Answers are
the literal next-token strings, leading space included when the answer follows a space
(``" Paris"``). Blank lines are skipped. Each example must satisfy, for the model's tokenizer:

* answer and wrong answer are each exactly one token after their prompt, and differ;
* clean and corrupted prompts have the same number of tokens (patching aligns positions).

Any violation raises ONE :class:`~mechflow.errors.DataError` naming the file, the line(s) and the
fix; nothing is written. Metric: logit difference, logit(answer) - logit(wrong answer).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import ValidationError

from mechflow.contracts.tasks import TaskExample
from mechflow.errors import DataError
from mechflow.tasks.common import Built
from mechflow.tasks.config import TaskConfig
from mechflow.tasks.dataset import TaskItem
from mechflow.tasks.tokenization import TaskTokenizer

log = logging.getLogger(__name__)

MAX_LISTED = 5


def read_examples(path: Path) -> list[tuple[int, TaskExample]]:
    """Parse and validate the JSONL file: ``[(line number, example), ...]``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataError(f"{path}: task file not found; check the task's `path` setting") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from exc
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno}); each line must "
                            "be one JSON object") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object with prompt, corrupted_prompt, answer, "
                            f"wrong_answer; got a JSON {type(obj).__name__}")
        try:
            out.append((lineno, TaskExample(**obj)))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<object>'}: {e['msg']}" for e in exc.errors())
            raise DataError(f"{path}:{lineno}: not a task example ({problems}); see "
                            "workflow/schemas/task_example.schema.json") from exc
    if not out:
        raise DataError(f"{path}: the file has no examples (it is empty); add one JSON object per line with "
                        "prompt, corrupted_prompt, answer, wrong_answer")
    return out


def _raise_all(path: Path, kind: str, problems: list[str], fix: str) -> None:
    """One DataError listing the first few problems ("line N: ...") of one kind."""
    if problems:
        n_lines = len({p.split(":", 1)[0] for p in problems})
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise DataError(f"{path}: {kind} on {n_lines} line(s): " + "; ".join(problems[:MAX_LISTED])
                        + more + f". {fix}")


def build_jsonl(cfg: TaskConfig, tok: TaskTokenizer, path: Path | None = None) -> Built:
    """Tokenize and check the user's examples (see module docstring)."""
    path = Path(path if path is not None else cfg.path)
    examples = read_examples(path)
    multi, same, lengths = [], [], []
    items: list[TaskItem] = []
    for lineno, ex in examples:
        answer_id = _one_token(tok, ex.prompt, ex.answer, f"line {lineno}: answer", multi)
        wrong_id = _one_token(tok, ex.prompt, ex.wrong_answer, f"line {lineno}: wrong_answer", multi)
        if answer_id is not None and answer_id == wrong_id:
            same.append(f"line {lineno}: answer {ex.answer!r} and wrong_answer {ex.wrong_answer!r} are both "
                        f"token {answer_id}")
        clean_ids, corrupted_ids = tok.encode(ex.prompt), tok.encode(ex.corrupted_prompt)
        if len(clean_ids) != len(corrupted_ids):
            lengths.append(f"line {lineno}: prompt has {len(clean_ids)} tokens, corrupted_prompt "
                           f"{len(corrupted_ids)}")
        if answer_id is None or wrong_id is None or answer_id == wrong_id or len(clean_ids) != len(corrupted_ids):
            continue
        items.append(TaskItem(id=ex.id if ex.id is not None else lineno, prompt=ex.prompt,
                              corrupted_prompt=ex.corrupted_prompt, answer=ex.answer, wrong_answer=ex.wrong_answer,
                              template=ex.template, clean_ids=clean_ids, corrupted_ids=corrupted_ids,
                              answer_id=answer_id, wrong_id=wrong_id, good_ids=[answer_id], bad_ids=[wrong_id]))
    _raise_all(path, f"answers that are not one token for {tok.model_name}", multi,
               "Each answer must be exactly one token; include the leading space (' Paris') when the answer "
               "follows a space, or pick a shorter answer")
    _raise_all(path, f"clean and corrupted prompts of different token lengths for {tok.model_name}", lengths,
               "Make corrupted_prompt tokenize to as many tokens as prompt (e.g. swap a name for another "
               "single-token name) so positions align for patching")
    _raise_all(path, "identical answer and wrong_answer tokens", same,
               "wrong_answer must be a different token from answer, or the logit difference is always 0")
    seen: dict = {}
    for it in items:
        if it.id in seen:
            raise DataError(f"{path}: id {it.id!r} appears twice; ids must be unique (or omit them: the line "
                            "number is used)")
        seen[it.id] = True
    if len(items) > cfg.n_prompts:
        log.info("jsonl task %s: using the first %d of %d examples (n_prompts)", cfg.name, cfg.n_prompts, len(items))
        items = items[: cfg.n_prompts]
    return Built(items, "logit_diff", {"path": str(path), "examples_in_file": len(examples)})


def _one_token(tok: TaskTokenizer, prompt: str, answer: str, label: str, problems: list[str]) -> int | None:
    answer_ids = tok.raw(answer)
    after = tok.continues_as(prompt, answer)
    if len(answer_ids) != 1:
        problems.append(f"{label} {answer!r} is {len(answer_ids)} tokens")
        return None
    if after != answer_ids[0]:
        problems.append(f"{label} {answer!r} merges with the end of the prompt when appended to it")
        return None
    return after
