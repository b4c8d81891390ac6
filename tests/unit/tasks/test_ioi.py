"""IOI prompts on SmolLM2's real tokenizer."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from mechflow.tasks import parse_task_config
from mechflow.tasks.ioi import NAMES, TEMPLATES, build_ioi, single_token_names

N = 64


@pytest.fixture(scope="module")
def built(smol_tok):
    return build_ioi(parse_task_config({"name": "ioi", "kind": "ioi", "n_prompts": N, "seed": 3}), smol_tok)


def test_names_are_filtered_to_single_tokens_with_leading_space(smol_tok):
    kept = single_token_names(smol_tok)
    for name in NAMES:
        ids = smol_tok.tokenizer(" " + name, add_special_tokens=False)["input_ids"]
        assert (name in kept) == (len(ids) == 1), name
        if name in kept:
            assert kept[name] == ids[0]
    # Known cases for SmolLM2: " Mary" is one token, " Zachary" is not (so the filter is live).
    assert "Mary" in kept and "Zachary" not in kept


def test_enough_templates_and_prompts(built):
    assert len(TEMPLATES) >= 15
    assert len(built.items) == N and built.posable
    assert built.details["templates_kept"] == len(TEMPLATES) and not built.details["templates_dropped"]
    used = Counter(it.template.split(":", 1)[1] for it in built.items)
    assert set(used) == set(TEMPLATES)


def test_abba_and_baba_are_balanced_and_well_formed(built):
    orders = Counter(it.template.split(":", 1)[0] for it in built.items)
    assert orders == {"ABBA": N // 2, "BABA": N // 2}
    for it in built.items:
        order, template = it.template.split(":", 1)
        io, s = it.answer.strip(), it.wrong_answer.strip()
        first = re.search(r"(\w+) and (\w+)", it.prompt)
        assert first is not None
        expected = (io, s) if order == "ABBA" else (s, io)
        assert first.groups() == expected, it.prompt
        # S is mentioned twice, IO once, and the prompt ends right before the IO.
        assert len(re.findall(rf"\b{s}\b", it.prompt)) == 2
        assert len(re.findall(rf"\b{io}\b", it.prompt)) == 1
        assert it.prompt.endswith(" to")


def test_abc_corruption_replaces_only_the_second_subject_mention(built, smol_tok):
    for it in built.items:
        assert len(it.clean_ids) == len(it.corrupted_ids)
        diff = [p for p, (a, b) in enumerate(zip(it.clean_ids, it.corrupted_ids)) if a != b]
        assert len(diff) == 1
        pos = diff[0]
        assert it.clean_ids[pos] == it.wrong_id  # S2
        third = smol_tok.tokenizer.decode([it.corrupted_ids[pos]]).strip()
        assert third not in (it.answer.strip(), it.wrong_answer.strip())
        assert it.corrupted_ids[pos] not in (it.answer_id, it.wrong_id)
        head, tail = it.prompt.rsplit(it.wrong_answer.strip(), 1)
        assert it.corrupted_prompt == head + third + tail


def test_token_ids_follow_the_bos_convention_and_answers(built, smol_tok):
    bos = smol_tok.bos_token_id
    assert smol_tok.prepend_bos and bos == 0  # config/model/smollm2_135m.yaml: <|endoftext|>
    for it in built.items:
        assert it.clean_ids[0] == bos and it.corrupted_ids[0] == bos
        assert it.clean_ids == smol_tok.encode(it.prompt)
        assert it.answer_id == smol_tok.single_token(it.answer)
        assert it.wrong_id == smol_tok.single_token(it.wrong_answer)
        assert it.good_ids == [it.answer_id] and it.bad_ids == [it.wrong_id]


def test_seed_is_deterministic_and_matters(smol_tok):
    cfg = {"name": "ioi", "kind": "ioi", "n_prompts": 8}
    a = build_ioi(parse_task_config({**cfg, "seed": 1}), smol_tok).items
    b = build_ioi(parse_task_config({**cfg, "seed": 1}), smol_tok).items
    c = build_ioi(parse_task_config({**cfg, "seed": 2}), smol_tok).items
    assert [x.prompt for x in a] == [x.prompt for x in b]
    assert [x.prompt for x in a] != [x.prompt for x in c]
