"""Indirect object identification (IOI) prompts, Wang et al. 2022 ("Interpretability in the Wild").

1. Keep the names whose mid-sentence form ``" Name"`` is exactly one token for this tokenizer.
2. Keep the templates whose rendered prompts tokenize with every name as its own token (BPE merges
   across a name boundary would misalign clean and corrupted positions); count the dropped ones.
3. Prompt ``i`` uses template ``i // 2`` (cycling) in ABBA order when ``i`` is even and BABA when
   odd, so both orders and all templates are balanced: ABBA "When Mary and John went to the store,
   John gave a drink to" / BABA "When John and Mary ...". Answer = the indirect object ``" Mary"``,
   wrong answer = the subject ``" John"``.
4. Corrupted prompt (the "ABC" distribution): the second mention of the subject is replaced by a
   third name C, so the prompt no longer says who the indirect object is. Names are single tokens,
   so the corrupted prompt has the clean prompt's length and positions.
5. Metric: logit difference, logit(IO) - logit(S) at the final position.

Each example's ``template`` field is ``"ABBA:<template>"`` or ``"BABA:<template>"``.
"""

from __future__ import annotations

import logging
import random

from mechflow.tasks.common import Built
from mechflow.tasks.config import TaskConfig
from mechflow.tasks.dataset import TaskItem
from mechflow.tasks.tokenization import TaskTokenizer

log = logging.getLogger(__name__)

# [A] and [B] are the first mentions, [S] the second mention of the subject. ABBA: A=IO, B=S;
# BABA: A=S, B=IO. Every prompt ends right before the indirect object.
TEMPLATES: tuple[str, ...] = (
    "When [A] and [B] went to the [PLACE], [S] gave a [OBJECT] to",
    "Then, [A] and [B] went to the [PLACE]. [S] gave a [OBJECT] to",
    "Then, [A] and [B] had a lot of fun at the [PLACE]. [S] gave a [OBJECT] to",
    "Then, [A] and [B] were working at the [PLACE]. [S] decided to give a [OBJECT] to",
    "Then, [A] and [B] were thinking about going to the [PLACE]. [S] wanted to give a [OBJECT] to",
    "Then, [A] and [B] had a long argument, and afterwards [S] said to",
    "After [A] and [B] went to the [PLACE], [S] gave a [OBJECT] to",
    "When [A] and [B] got a [OBJECT] at the [PLACE], [S] decided to give it to",
    "When [A] and [B] got a [OBJECT] at the [PLACE], [S] decided to give the [OBJECT] to",
    "While [A] and [B] were working at the [PLACE], [S] gave a [OBJECT] to",
    "While [A] and [B] were commuting to the [PLACE], [S] gave a [OBJECT] to",
    "After the lunch, [A] and [B] went to the [PLACE]. [S] gave a [OBJECT] to",
    "Afterwards, [A] and [B] went to the [PLACE]. [S] gave a [OBJECT] to",
    "Then, [A] and [B] had a long argument. Afterwards [S] said to",
    "The [PLACE] [A] and [B] went to had a [OBJECT]. [S] gave it to",
    "Friends [A] and [B] found a [OBJECT] at the [PLACE]. [S] gave it to",
)

PLACES: tuple[str, ...] = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station",
                           "park", "library")
OBJECTS: tuple[str, ...] = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack",
                            "book", "letter")

NAMES: tuple[str, ...] = (
    "Mary", "John", "Alice", "Bob", "James", "Michael", "Robert", "David", "William", "Richard", "Joseph",
    "Thomas", "Charles", "Daniel", "Matthew", "Anthony", "Mark", "Paul", "Steven", "Andrew", "Kevin", "Brian",
    "George", "Edward", "Jason", "Jeff", "Ryan", "Jacob", "Gary", "Eric", "Jonathan", "Stephen", "Larry",
    "Justin", "Scott", "Frank", "Peter", "Samuel", "Patrick", "Jack", "Dennis", "Jerry", "Tyler", "Aaron",
    "Henry", "Adam", "Nathan", "Zachary", "Kyle", "Walter", "Harold", "Jeremy", "Ethan", "Carl", "Keith",
    "Roger", "Arthur", "Sean", "Christian", "Austin", "Jesse", "Dylan", "Bryan", "Joe", "Jordan", "Billy",
    "Bruce", "Albert", "Willie", "Gabriel", "Logan", "Alan", "Juan", "Wayne", "Roy", "Ralph", "Randy",
    "Eugene", "Vincent", "Russell", "Elijah", "Louis", "Bobby", "Philip", "Johnny", "Patricia", "Jennifer",
    "Linda", "Elizabeth", "Barbara", "Susan", "Jessica", "Sarah", "Karen", "Lisa", "Nancy", "Betty", "Sandra",
    "Ashley", "Emily", "Donna", "Michelle", "Carol", "Amanda", "Melissa", "Deborah", "Stephanie", "Rebecca",
    "Laura", "Helen", "Sharon", "Cynthia", "Kathleen", "Amy", "Anna", "Angela", "Ruth", "Brenda", "Pamela",
    "Nicole", "Katherine", "Samantha", "Christine", "Emma", "Catherine", "Debra", "Virginia", "Rachel",
    "Janet", "Maria", "Heather", "Diane", "Julie", "Joyce", "Victoria", "Kelly", "Christina", "Lauren",
    "Joan", "Evelyn", "Olivia", "Judith", "Megan", "Martha", "Andrea", "Grace", "Sara", "Hannah", "Jacqueline",
    "Rose", "Alex", "Max", "Sam", "Tom", "Ben", "Kate", "Lucy", "Jane", "Tim", "Dan", "Nick", "Chris", "Amber",
)


def _render(template: str, a: str, b: str, s: str, place: str, obj: str) -> str:
    return (template.replace("[A]", a).replace("[B]", b).replace("[S]", s)
            .replace("[PLACE]", place).replace("[OBJECT]", obj))


def single_token_names(tok: TaskTokenizer, names: tuple[str, ...] = NAMES) -> dict[str, int]:
    """Names whose mid-sentence form ``" Name"`` is exactly one token, mapped to that token id."""
    out = {}
    for name in dict.fromkeys(names):
        token = tok.single_token(" " + name)
        if token is not None:
            out[name] = token
    return out


def _make_item(tok: TaskTokenizer, idx: int, template: str, order: str, io: str, s: str, c: str,
               place: str, obj: str, name_ids: dict[str, int]) -> TaskItem | None:
    """One example, or None when its tokenization is not name-aligned."""
    a, b = (io, s) if order == "ABBA" else (s, io)
    prompt = _render(template, a, b, s, place, obj)
    corrupted = _render(template, a, b, c, place, obj)
    clean_ids, corrupted_ids = tok.encode(prompt), tok.encode(corrupted)
    io_id, s_id, c_id = name_ids[io], name_ids[s], name_ids[c]
    if len(clean_ids) != len(corrupted_ids) or tok.continues_as(prompt, " " + io) != io_id:
        return None
    if tok.continues_as(prompt, " " + s) != s_id:
        return None
    # Name-aligned: clean and corrupted differ exactly at S2, and S and IO stand as whole tokens.
    diff = [p for p, (x, y) in enumerate(zip(clean_ids, corrupted_ids)) if x != y]
    if len(diff) != 1 or clean_ids[diff[0]] != s_id or corrupted_ids[diff[0]] != c_id:
        return None
    if clean_ids.count(io_id) != 1 or clean_ids.count(s_id) != 2:
        return None
    return TaskItem(id=idx, prompt=prompt, corrupted_prompt=corrupted, answer=" " + io, wrong_answer=" " + s,
                    template=f"{order}:{template}", clean_ids=clean_ids, corrupted_ids=corrupted_ids,
                    answer_id=io_id, wrong_id=s_id, good_ids=[io_id], bad_ids=[s_id])


def build_ioi(cfg: TaskConfig, tok: TaskTokenizer) -> Built:
    """IOI examples for `tok` (see module docstring)."""
    name_ids = single_token_names(tok)
    names = sorted(name_ids)
    dropped_names = [n for n in dict.fromkeys(NAMES) if n not in name_ids]
    if len(names) < 3:
        return Built([], "logit_diff", {"names_kept": len(names)}, posable=False,
                     reason=f"only {len(names)} of {len(NAMES)} names are single tokens for {tok.model_name}; "
                     "IOI needs 3")
    probe = names[:3]
    templates = [t for t in TEMPLATES if all(
        _make_item(tok, 0, t, order, probe[0], probe[1], probe[2], PLACES[0], OBJECTS[0], name_ids) is not None
        for order in ("ABBA", "BABA"))]
    dropped_templates = [t for t in TEMPLATES if t not in templates]
    if dropped_names:
        log.info("ioi: %d/%d names are not single tokens for %s and were dropped", len(dropped_names),
                 len(NAMES), tok.model_name)
    if dropped_templates:
        log.warning("ioi: %d/%d templates misalign names for %s and were dropped", len(dropped_templates),
                    len(TEMPLATES), tok.model_name)
    if not templates:
        return Built([], "logit_diff", {"templates_dropped": dropped_templates}, posable=False,
                     reason=f"no IOI template tokenizes with name-aligned positions for {tok.model_name}")
    rng = random.Random(cfg.seed)
    items: list[TaskItem] = []
    rejected = 0
    while len(items) < cfg.n_prompts:
        i = len(items)
        template = templates[(i // 2) % len(templates)]
        order = "ABBA" if i % 2 == 0 else "BABA"
        io, s, c = rng.sample(names, 3)
        item = _make_item(tok, i, template, order, io, s, c, rng.choice(PLACES), rng.choice(OBJECTS), name_ids)
        if item is None:
            rejected += 1
            if rejected > 20 * cfg.n_prompts:
                raise RuntimeError(f"ioi: could not build aligned prompts for {tok.model_name}")
            continue
        items.append(item)
    details = {
        "names_kept": len(names), "names_dropped": dropped_names,
        "templates_kept": len(templates), "templates_dropped": dropped_templates,
        "prompts_rejected": rejected, "corruption": "ABC: second subject mention replaced by a third name",
        "n_abba": sum(it.template.startswith("ABBA") for it in items),
        "n_baba": sum(it.template.startswith("BABA") for it in items),
    }
    return Built(items, "logit_diff", details)
