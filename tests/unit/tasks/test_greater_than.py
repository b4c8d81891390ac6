"""Greater-than: tokenizer modes, exactness of the good/bad digit sets, unposable tokenizers."""

from __future__ import annotations

import re

from task_helpers import word_level_tokenizer

from mechflow.tasks import TaskTokenizer, parse_task_config
from mechflow.tasks.baseline import Scores, summarize
from mechflow.tasks.dataset import TaskDataset
from mechflow.tasks.greater_than import NOUNS, build_greater_than

YEAR = re.compile(r"the year (\d\d)(\d\d) to the year (\d\d)$")


def _cfg(n=63, centuries=(17,)):
    return parse_task_config({"name": "gt", "kind": "greater_than", "n_prompts": n, "seed": 0,
                              "centuries": list(centuries)})


def _token_text(tok, i):
    return tok.tokenizer.decode([i])


def test_digit_mode_on_smollm2_and_its_sets_decide_greater_exactly(smol_tok):
    built = build_greater_than(_cfg(centuries=(15, 17)), smol_tok)
    assert built.details["mode"] == "digit" and built.metric == "prob_diff" and len(built.items) == 63
    for it in built.items:
        century, start, century2 = YEAR.search(it.prompt).groups()
        assert century == century2 and start[1] == "9"
        start_year = int(century + start)
        # Brute force over every end year each candidate digit can begin: all greater or none.
        for ids, greater in ((it.good_ids, True), (it.bad_ids, False)):
            for i in ids:
                d = _token_text(smol_tok, i)
                ends = [int(f"{century}{d}{u}") for u in range(10)]
                assert all((e > start_year) == greater for e in ends), (it.prompt, d)
        digits = sorted(_token_text(smol_tok, i) for i in it.good_ids + it.bad_ids)
        assert digits == [str(d) for d in range(10)]
        assert it.corrupted_prompt == it.prompt.replace(f"year {century}{start} to", f"year {century}01 to")
        assert len(it.clean_ids) == len(it.corrupted_ids)


def test_digit_mode_balances_start_decades(smol_tok):
    built = build_greater_than(_cfg(n=63), smol_tok)
    decades = [YEAR.search(it.prompt).group(2)[0] for it in built.items]
    assert {d: decades.count(d) for d in set(decades)} == {str(a): 7 for a in range(9)}


def _words():
    return ["The", "lasted", "from", "the", "year", "to", *NOUNS]


def test_two_digit_mode_is_the_papers_setup():
    hf = word_level_tokenizer(_words() + [f"{y:02d}" for y in range(100)] + ["17"], split_digit_pairs=True)
    tok = TaskTokenizer.from_model_cfg({"name": "word_level", "prepend_bos": True}, hf)
    built = build_greater_than(_cfg(n=40), tok)
    assert built.details["mode"] == "two_digit" and len(built.items) == 40
    for it in built.items:
        start = int(YEAR.search(it.prompt).group(2))
        assert 2 <= start <= 98
        good = sorted(int(hf.decode([i])) for i in it.good_ids)
        bad = sorted(int(hf.decode([i])) for i in it.bad_ids)
        assert good == list(range(start + 1, 100)) and bad == list(range(0, start + 1))
        assert it.clean_ids[0] == hf.bos_token_id and len(it.clean_ids) == len(it.corrupted_ids)


def test_unposable_tokenizer_gives_a_failing_verdict_not_garbage():
    hf = word_level_tokenizer(_words(), split_digit_pairs=False)  # every year is the same [UNK]
    tok = TaskTokenizer.from_model_cfg({"name": "word_level", "prepend_bos": True}, hf)
    built = build_greater_than(_cfg(), tok)
    assert not built.posable and built.items == [] and "neither" in built.reason
    ds = TaskDataset("gt", "greater_than", built.metric, [], {"posable": False, "reason": built.reason})
    summary = summarize(ds, Scores([], [], []))
    assert summary["verdict"].startswith("FAILS: cannot be posed") and summary["accuracy"] is None
