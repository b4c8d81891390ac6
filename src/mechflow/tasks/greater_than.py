"""Greater-than (Hanna et al. 2023, "How does GPT-2 compute greater-than?").

Prompt: "The {noun} lasted from the year {XX}{YY} to the year {XX}"; the model must continue with
an end year greater than the start year XXYY. Corrupted prompt: start year XX01 (Hanna et al.'s
"01-year" baseline: every two-digit end year except 00/01 is then greater).

Metric (the paper's *probability difference*): ``P(end > start) - P(end <= start)`` summed over the
next-token candidates, computed at the final position. How the candidates look depends on the
tokenizer, detected per tokenizer:

1. ``two_digit`` mode (GPT-2-like, the paper's setting): every "00".."99" is one token after
   "...the year XX". Start years YY in 02..98; good = {YY' > YY}, bad = {YY' <= YY} over the 100
   two-digit tokens. The metric is exactly the paper's.
2. ``digit`` mode (SmolLM2, Gemma-3: numbers split into single digits): the next token is only the
   tens digit d of the end year. Whether the end year is greater is decided by d alone exactly
   when the start year ends in 9: for start XX(a)9, an end year with tens digit d > a is greater,
   and with d <= a it is at most XX(a)9, hence not greater (the would-be tie d == a always loses).
   So the start years are XX09, XX19, ..., XX89 (a = 0..8, balanced across prompts), good =
   digits > a, bad = digits <= a, and the single-position metric equals the paper's probability
   difference restricted to the tens digit with no tie convention needed. The cost is fewer
   distinct start years (9 per century); nouns and centuries supply the rest of the variety.
3. Neither: the task cannot be posed at one position; the dataset is empty and its metadata
   says why (the baseline verdict then reads "FAILS: cannot be posed ...").

Accuracy counts a prompt as correct when P(good) > P(bad), i.e. the metric is positive.
"""

from __future__ import annotations

import logging
import random

from mechflow.tasks.common import Built
from mechflow.tasks.config import TaskConfig
from mechflow.tasks.dataset import TaskItem
from mechflow.tasks.tokenization import TaskTokenizer

log = logging.getLogger(__name__)

TEMPLATE = "The {noun} lasted from the year {century}{start} to the year {century}"
CORRUPTED_START = "01"

# Nouns of Hanna et al. (2023), a subset of their list of events that last a span of years.
NOUNS: tuple[str, ...] = (
    "abduction", "accord", "affair", "agreement", "appraisal", "assessment", "attack", "campaign",
    "captivity", "case", "challenge", "chaos", "clash", "collaboration", "competition", "confrontation",
    "conspiracy", "construction", "consultation", "contract", "convention", "cooperation", "custody",
    "deal", "decline", "development", "dispute", "domination", "dynasty", "effort", "employment",
    "endeavor", "engagement", "epidemic", "evaluation", "exchange", "existence", "expansion", "expedition",
    "fame", "friendship", "growth", "hardship", "hostility", "illness", "imprisonment", "improvement",
    "insurgency", "invasion", "investigation", "journey", "kingdom", "marriage", "modernization",
    "negotiation", "occupation", "operation", "outbreak", "pilgrimage", "plague", "plan", "practice",
    "process", "program", "project", "pursuit", "quest", "rebellion", "reign", "relationship", "riot",
    "rivalry", "romance", "rule", "siege", "strike", "study", "tour", "tradition", "treaty", "trial",
    "trip", "voyage", "war", "warfare",
)


def _probe_prompt(century: int) -> str:
    return TEMPLATE.format(noun="war", century=century, start="32")


def detect_mode(tok: TaskTokenizer, centuries: tuple[int, ...]) -> tuple[str | None, dict[str, int], str]:
    """How years continue after "...the year XX" for this tokenizer.

    Returns:
        (mode, candidate ids, explanation): mode ``two_digit`` with ids of "00".."99", ``digit``
        with ids of "0".."9", or None with the reason the task cannot be posed.
    """
    probes = [_probe_prompt(c) for c in centuries]

    def ids_for(strings: list[str]) -> dict[str, int] | None:
        out = {}
        for s in strings:
            found = {tok.continues_as(p, s) for p in probes}
            if len(found) != 1 or None in found:
                return None
            out[s] = found.pop()
        return out if len(set(out.values())) == len(out) else None

    two = ids_for([f"{y:02d}" for y in range(100)])
    if two is not None:
        return "two_digit", two, "every two-digit year 00..99 is one token after the century"
    one = ids_for([str(d) for d in range(10)])
    if one is not None:
        return "digit", one, "years are split into single digits; the next token is the tens digit"
    return None, {}, (f"{tok.model_name}'s tokenizer continues '...the year {centuries[0]}' with neither one "
                      "token per two-digit year nor one token per digit, so P(end year > start year) is not "
                      "a next-token quantity")


def _item(tok: TaskTokenizer, idx: int, noun: str, century: int, start: str, answer: str, wrong: str,
          candidates: dict[str, int], good: list[str], bad: list[str]) -> TaskItem | None:
    prompt = TEMPLATE.format(noun=noun, century=century, start=start)
    corrupted = TEMPLATE.format(noun=noun, century=century, start=CORRUPTED_START)
    clean_ids, corrupted_ids = tok.encode(prompt), tok.encode(corrupted)
    if len(clean_ids) != len(corrupted_ids):
        return None
    # The candidate ids must be what this exact prompt continues with (no merge with the century).
    if tok.continues_as(prompt, answer) != candidates[answer] or tok.continues_as(prompt, wrong) != candidates[wrong]:
        return None
    return TaskItem(id=idx, prompt=prompt, corrupted_prompt=corrupted, answer=answer, wrong_answer=wrong,
                    template=TEMPLATE, clean_ids=clean_ids, corrupted_ids=corrupted_ids,
                    answer_id=candidates[answer], wrong_id=candidates[wrong],
                    good_ids=[candidates[s] for s in good], bad_ids=[candidates[s] for s in bad])


def build_greater_than(cfg: TaskConfig, tok: TaskTokenizer) -> Built:
    """Greater-than examples for `tok` (see module docstring)."""
    mode, candidates, why = detect_mode(tok, cfg.centuries)
    details: dict = {"mode": mode, "mode_reason": why, "centuries": list(cfg.centuries),
                     "corrupted_start": CORRUPTED_START}
    if mode is None:
        log.warning("greater_than cannot be posed for %s: %s", tok.model_name, why)
        return Built([], "prob_diff", details, posable=False, reason=why)
    rng = random.Random(cfg.seed)
    if mode == "digit":
        starts = list(range(9))  # tens digit a of start year XX(a)9
    else:
        starts = list(range(2, 99))  # YY in 02..98, as in Hanna et al.
    pools = {s: [(n, c) for n in NOUNS for c in cfg.centuries] for s in starts}
    for pool in pools.values():
        rng.shuffle(pool)
    items: list[TaskItem] = []
    rejected = 0
    i = 0
    while len(items) < cfg.n_prompts and any(pools.values()):
        s = starts[i % len(starts)] if mode == "digit" else rng.choice(starts)
        i += 1
        if not pools[s]:
            continue
        noun, century = pools[s].pop()
        if mode == "digit":
            start, answer, wrong = f"{s}9", str(s + 1), str(s)
            good = [str(d) for d in range(s + 1, 10)]
            bad = [str(d) for d in range(0, s + 1)]
        else:
            start, answer, wrong = f"{s:02d}", f"{s + 1:02d}", f"{s:02d}"
            good = [f"{y:02d}" for y in range(s + 1, 100)]
            bad = [f"{y:02d}" for y in range(0, s + 1)]
        item = _item(tok, len(items), noun, century, start, answer, wrong, candidates, good, bad)
        if item is None:
            rejected += 1
            continue
        items.append(item)
    details["prompts_rejected"] = rejected
    if rejected:
        log.warning("greater_than: %d prompts rejected for %s (unequal lengths or merged tokens)", rejected,
                    tok.model_name)
    if not items:
        return Built([], "prob_diff", details, posable=False,
                     reason=f"no greater-than prompt tokenizes with aligned years for {tok.model_name}")
    return Built(items, "prob_diff", details)
