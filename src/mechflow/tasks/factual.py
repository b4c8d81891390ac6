"""Factual recall: subject -> attribute, with a corrupted subject (Meng et al. 2022, ROME).

1. Curated real facts, grouped by relation, each with a prompt template ending right before the
   attribute: "The Eiffel Tower is located in the city of" -> " Paris".
2. Keep the facts whose answer (with its leading space) is exactly one token for this tokenizer.
3. Corrupted prompt: the same relation with another subject whose prompt has the same token length
   and whose answer differs ("The Colosseum is located in the city of"). Wrong answer = the
   corrupted subject's attribute (" Rome"), so the metric contrasts the two facts.
4. Facts with no equal-length partner are dropped (counted in the metadata); each fact is used
   at most once as a clean prompt, so ``n_prompts`` is an upper bound.
5. Metric: logit difference, logit(answer) - logit(wrong answer) at the final position.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict

from mechflow.tasks.common import Built
from mechflow.tasks.config import TaskConfig
from mechflow.tasks.dataset import TaskItem
from mechflow.tasks.tokenization import TaskTokenizer

log = logging.getLogger(__name__)

RELATIONS: dict[str, str] = {
    "landmark_city": "The {} is located in the city of",
    "country_capital": "The capital of {} is the city of",
    "country_language": "The official language of {} is",
}

# (relation, subject, attribute). Attributes are written without the leading space.
FACTS: tuple[tuple[str, str, str], ...] = (
    ("landmark_city", "Eiffel Tower", "Paris"),
    ("landmark_city", "Louvre", "Paris"),
    ("landmark_city", "Colosseum", "Rome"),
    ("landmark_city", "Pantheon", "Rome"),
    ("landmark_city", "Big Ben", "London"),
    ("landmark_city", "Tower Bridge", "London"),
    ("landmark_city", "Brandenburg Gate", "Berlin"),
    ("landmark_city", "Kremlin", "Moscow"),
    ("landmark_city", "Acropolis", "Athens"),
    ("landmark_city", "Sagrada Familia", "Barcelona"),
    ("landmark_city", "Forbidden City", "Beijing"),
    ("landmark_city", "Space Needle", "Seattle"),
    ("landmark_city", "Sydney Opera House", "Sydney"),
    ("landmark_city", "Hagia Sophia", "Istanbul"),
    ("landmark_city", "Leaning Tower of Pisa", "Pisa"),
    ("landmark_city", "Golden Temple", "Amritsar"),
    ("landmark_city", "Prado Museum", "Madrid"),
    ("landmark_city", "Rijksmuseum", "Amsterdam"),
    ("landmark_city", "Tokyo Tower", "Tokyo"),
    ("landmark_city", "Vatican Museums", "Rome"),
    ("landmark_city", "Charles Bridge", "Prague"),
    ("landmark_city", "Willis Tower", "Chicago"),
    ("landmark_city", "Alhambra", "Granada"),
    ("landmark_city", "Parthenon", "Athens"),
    ("landmark_city", "Reichstag building", "Berlin"),
    ("landmark_city", "Trevi Fountain", "Rome"),
    ("landmark_city", "Buckingham Palace", "London"),
    ("landmark_city", "Notre-Dame Cathedral", "Paris"),
    ("country_capital", "France", "Paris"),
    ("country_capital", "Germany", "Berlin"),
    ("country_capital", "Italy", "Rome"),
    ("country_capital", "Japan", "Tokyo"),
    ("country_capital", "Spain", "Madrid"),
    ("country_capital", "Russia", "Moscow"),
    ("country_capital", "Egypt", "Cairo"),
    ("country_capital", "Greece", "Athens"),
    ("country_capital", "Canada", "Ottawa"),
    ("country_capital", "Australia", "Canberra"),
    ("country_capital", "China", "Beijing"),
    ("country_capital", "England", "London"),
    ("country_capital", "Ireland", "Dublin"),
    ("country_capital", "Austria", "Vienna"),
    ("country_capital", "Poland", "Warsaw"),
    ("country_capital", "Portugal", "Lisbon"),
    ("country_capital", "Norway", "Oslo"),
    ("country_capital", "Sweden", "Stockholm"),
    ("country_capital", "Kenya", "Nairobi"),
    ("country_capital", "Peru", "Lima"),
    ("country_capital", "Cuba", "Havana"),
    ("country_capital", "Thailand", "Bangkok"),
    ("country_capital", "Turkey", "Ankara"),
    ("country_capital", "Hungary", "Budapest"),
    ("country_capital", "Finland", "Helsinki"),
    ("country_capital", "Denmark", "Copenhagen"),
    ("country_capital", "Belgium", "Brussels"),
    ("country_capital", "Argentina", "Buenos Aires"),
    ("country_capital", "Iran", "Tehran"),
    ("country_capital", "Iraq", "Baghdad"),
    ("country_capital", "Syria", "Damascus"),
    ("country_capital", "Chile", "Santiago"),
    ("country_capital", "Colombia", "Bogota"),
    ("country_capital", "Venezuela", "Caracas"),
    ("country_capital", "Scotland", "Edinburgh"),
    ("country_capital", "Romania", "Bucharest"),
    ("country_language", "France", "French"),
    ("country_language", "Germany", "German"),
    ("country_language", "Italy", "Italian"),
    ("country_language", "Spain", "Spanish"),
    ("country_language", "Japan", "Japanese"),
    ("country_language", "Russia", "Russian"),
    ("country_language", "China", "Chinese"),
    ("country_language", "Greece", "Greek"),
    ("country_language", "Portugal", "Portuguese"),
    ("country_language", "Poland", "Polish"),
    ("country_language", "Sweden", "Swedish"),
    ("country_language", "the Netherlands", "Dutch"),
    ("country_language", "Turkey", "Turkish"),
    ("country_language", "Brazil", "Portuguese"),
    ("country_language", "Mexico", "Spanish"),
    ("country_language", "Korea", "Korean"),
    ("country_language", "Israel", "Hebrew"),
    ("country_language", "Finland", "Finnish"),
    ("country_language", "Argentina", "Spanish"),
    ("country_language", "Hungary", "Hungarian"),
    ("country_language", "Denmark", "Danish"),
    ("country_language", "Norway", "Norwegian"),
    ("country_language", "Iran", "Persian"),
    ("country_language", "Egypt", "Arabic"),
)


def build_factual(cfg: TaskConfig, tok: TaskTokenizer) -> Built:
    """Factual-recall examples for `tok` (see module docstring)."""
    kept: list[tuple[str, str, str, str, list[int], int]] = []  # relation, subject, attr, prompt, ids, answer id
    multi_token: list[str] = []
    for relation, subject, attribute in FACTS:
        prompt = RELATIONS[relation].format(subject)
        answer_id = tok.continues_as(prompt, " " + attribute)
        if answer_id is None or tok.single_token(" " + attribute) != answer_id:
            multi_token.append(f"{subject} -> {attribute}")
            continue
        kept.append((relation, subject, attribute, prompt, tok.encode(prompt), answer_id))
    by_key: dict[tuple[str, int], list[int]] = defaultdict(list)
    for k, (relation, _, _, _, ids, _) in enumerate(kept):
        by_key[(relation, len(ids))].append(k)
    rng = random.Random(cfg.seed)
    order = list(range(len(kept)))
    rng.shuffle(order)
    items: list[TaskItem] = []
    unpaired: list[str] = []
    for k in order:
        relation, subject, attribute, prompt, ids, answer_id = kept[k]
        partners = [j for j in by_key[(relation, len(ids))] if kept[j][5] != answer_id]
        if not partners:
            unpaired.append(subject)
            continue
        if len(items) >= cfg.n_prompts:
            continue
        j = rng.choice(partners)
        _, c_subject, c_attribute, c_prompt, c_ids, c_answer_id = kept[j]
        items.append(TaskItem(id=len(items), prompt=prompt, corrupted_prompt=c_prompt, answer=" " + attribute,
                              wrong_answer=" " + c_attribute, template=relation, clean_ids=ids,
                              corrupted_ids=c_ids, answer_id=answer_id, wrong_id=c_answer_id,
                              good_ids=[answer_id], bad_ids=[c_answer_id]))
    log.info("factual_recall: %d facts, %d multi-token answers dropped, %d without an equal-length partner, "
             "%d examples for %s", len(FACTS), len(multi_token), len(unpaired), len(items), tok.model_name)
    details = {"facts": len(FACTS), "facts_single_token": len(kept), "dropped_multi_token": multi_token,
               "dropped_no_partner": unpaired}
    if not items:
        return Built([], "logit_diff", details, posable=False,
                     reason=f"no fact has a single-token answer and an equal-length partner for {tok.model_name}")
    if len(items) < cfg.n_prompts:
        log.warning("factual_recall: only %d of n_prompts=%d examples available for %s", len(items),
                    cfg.n_prompts, tok.model_name)
    return Built(items, "logit_diff", details)
