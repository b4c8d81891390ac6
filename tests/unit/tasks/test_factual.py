"""Factual-recall prompts on SmolLM2's real tokenizer."""

from __future__ import annotations

import pytest

from mechflow.tasks import parse_task_config
from mechflow.tasks.factual import FACTS, RELATIONS, build_factual


@pytest.fixture(scope="module")
def built(smol_tok):
    return build_factual(parse_task_config({"name": "fr", "kind": "factual_recall", "n_prompts": 1000}), smol_tok)


def test_at_least_30_real_facts_survive_the_single_token_filter(built, smol_tok):
    assert built.details["facts"] == len(FACTS) >= 30
    assert len(built.items) >= 30
    for it in built.items:
        assert len(smol_tok.raw(it.answer)) == 1 and len(smol_tok.raw(it.wrong_answer)) == 1
    # The filter is live: "Buenos Aires" is several tokens, so that fact is dropped.
    assert any("Buenos Aires" in d for d in built.details["dropped_multi_token"])


def test_corruption_is_another_subject_of_the_same_relation_with_its_attribute(built, smol_tok):
    facts = {(RELATIONS[r].format(s)): (r, a) for r, s, a in FACTS}
    for it in built.items:
        relation, attribute = facts[it.prompt]
        c_relation, c_attribute = facts[it.corrupted_prompt]
        assert it.template == relation == c_relation
        assert it.answer == " " + attribute and it.wrong_answer == " " + c_attribute
        assert it.answer_id != it.wrong_id
        assert len(it.clean_ids) == len(it.corrupted_ids)
        assert it.clean_ids == smol_tok.encode(it.prompt) and it.corrupted_ids == smol_tok.encode(it.corrupted_prompt)


def test_each_fact_is_a_clean_prompt_at_most_once_and_n_prompts_caps(built, smol_tok):
    prompts = [it.prompt for it in built.items]
    assert len(prompts) == len(set(prompts))
    few = build_factual(parse_task_config({"name": "fr", "kind": "factual_recall", "n_prompts": 5}), smol_tok)
    assert len(few.items) == 5
