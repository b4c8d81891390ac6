"""Cross-model feature matching stage on tiny random models with real SAELens SAEs.

References: brute-force word maxima from `run_with_cache` + `sae.encode`; the full unembedding
(`unembed_directions`) for logit profiles; a planted match (B's SAE = A's SAE with its latents
permuted) for the matching; independent random models for the null.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mechflow.errors import ConfigError, DataError
from mechflow.features.attribution import SplicedSAE
from mechflow.features.logits import unembed_directions
from mechflow.features.matching_stage import feature_matching
from mechflow.features.profiles import activation_profile, control_activation_profile, logit_profile
from mechflow.features.texts import ModelSide, corpus_passages, shared_texts, tokenize_words, word_spans
from mechflow.tasks.dataset import TaskItem, write_dataset
from mechflow.testing import make_tiny_llama, make_tiny_sae

HOOK = "blocks.0.hook_resid_post"
WORDS = ["the", "cat", "dog", "sat", "on", "mat", "red", "big", "ran", "fast"]
# 50 strings (the tiny models' d_vocab): BOS, space, letters, words with and without a leading space,
# punctuation. "q" and "z" are missing, so words holding them lose those letters' tokens.
VOCAB = (["<s>", " "] + [c for c in "abcdefghijklmnoprstuvwxy"] + [" " + w for w in WORDS] + WORDS[:8]
         + [".", ",", "!", "?", "-", "'"])
assert len(VOCAB) == 50 and len(set(VOCAB)) == 50


class GreedyTokenizer:
    """A real (if small) tokenizer: greedy longest match over `vocab`, with character offsets.

    Characters no piece covers are dropped, as a byte-less tokenizer would drop unknown characters.
    """

    def __init__(self, vocab: list[str], bos: str = "<s>"):
        self.vocab = list(vocab)
        self.index = {s: i for i, s in enumerate(self.vocab)}
        self.all_special_ids = [self.index[bos]]
        self.pieces = sorted((s for s in self.vocab if s != bos), key=len, reverse=True)

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        ids, offsets, p = [], [], 0
        while p < len(text):
            piece = next((s for s in self.pieces if text.startswith(s, p)), None)
            if piece is None:
                p += 1
                continue
            ids.append(self.index[piece])
            offsets.append((p, p + len(piece)))
            p += len(piece)
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = offsets
        return out

    def convert_ids_to_tokens(self, ids):
        return [self.vocab[i] if 0 <= i < len(self.vocab) else None for i in ids]


def make_side(name: str, model, vocab=VOCAB) -> ModelSide:
    tok = GreedyTokenizer(vocab)
    return ModelSide(name, model, tok, True, tok.index["<s>"])


def random_texts(n=40, seed=0, extra=("quiz", "zebra", "box", "zq")) -> list[str]:
    rng = np.random.default_rng(seed)
    words = WORDS + list(extra)
    out = []
    for _ in range(n):
        ws = rng.choice(words, size=int(rng.integers(3, 9))).tolist()
        text = " ".join(ws)
        if rng.random() < 0.5:
            text = text.replace(" ", "  ", 1) + rng.choice([".", "!", ","])
        out.append(text)
    return out


def make_sae(d_in=32, d_sae=24, seed=0, k=6, dtype="float64"):
    return make_tiny_sae(d_in, d_sae, "topk", seed, k, dtype)


def save_sae(sae, folder: Path, model: str, hook: str = HOOK) -> Path:
    """SAELens folder + the `training.json` train_sae writes; returns the training.json path."""
    sae.cfg.metadata.hook_name = hook
    sae.cfg.metadata.model_name = model
    sae.save_model(folder)
    (folder / "training.json").write_text(json.dumps({"exclude_bos": True, "hook": hook, "model": model}))
    return folder / "training.json"


def permuted(sae, perm: np.ndarray):
    """B's latent j is A's latent perm[j]."""
    out = make_sae(sae.cfg.d_in, sae.cfg.d_sae, k=sae.cfg.k)
    p = torch.as_tensor(perm)
    with torch.no_grad():
        out.W_enc.copy_(sae.W_enc[:, p])
        out.b_enc.copy_(sae.b_enc[p])
        out.W_dec.copy_(sae.W_dec[p])
        out.b_dec.copy_(sae.b_dec)
    return out


def outputs(folder: Path) -> dict[str, Path]:
    return {"matching": folder / "feature_matching.json", "summary": folder / "feature_matching.md",
            "figure": folder / "feature_matching.png"}


CFG = {"seed": 0, "null_kind": "shuffle", "n_permutations": 49}


def test_word_spans_and_token_overlap():
    side = make_side("m", None)
    text = "the  quiz, cat"
    spans = word_spans(text)
    assert [text[s:e] for s, e in spans] == ["the", "quiz,", "cat"]
    tk = tokenize_words(side, text, spans)
    pieces = [VOCAB[i] for i in tk.ids]
    # BOS first; "q" has no piece (dropped); " cat" carries its leading space and still overlaps "cat"
    assert pieces == ["<s>", "the", " ", " ", "u", "i", ",", " cat"]
    pairs = sorted(zip(tk.word.tolist(), tk.token.tolist()))  # token index counts text tokens, BOS excluded
    assert pairs == [(0, 0), (1, 3), (1, 4), (1, 5), (2, 6)]


def test_activation_profile_equals_brute_force_word_maxima(tiny_llama):
    sae = make_sae()
    side = make_side("tiny", tiny_llama)
    texts = random_texts(12, seed=3)
    spans = [word_spans(t) for t in texts]
    sp = SplicedSAE.build(tiny_llama, sae, HOOK, 1)
    tokenized = [tokenize_words(side, t, s) for t, s in zip(texts, spans)]
    P, seen, l0 = activation_profile(sp, side, tokenized, [len(s) for s in spans], batch_size=3)
    R = torch.randn(32, 10, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    C = control_activation_profile(sp, side, tokenized, [len(s) for s in spans], R, k=3, batch_size=5)
    assert l0 == pytest.approx(6.0)  # TopK, k = 6
    row = 0
    for text, sp_, tk in zip(texts, spans, tokenized):
        _, cache = tiny_llama.run_with_cache(torch.tensor([tk.ids]), names_filter=[HOOK])
        lat = sae.encode(cache[HOOK][0]).detach().numpy()  # [pos, d_sae], BOS at 0
        pre = np.maximum((cache[HOOK][0] - sae.b_dec).detach().numpy() @ R.double().numpy(), 0)
        ctrl = np.where(pre >= np.sort(pre, axis=1)[:, [-3]], pre, 0)  # top-3 per position
        enc = side.tokenizer(text, return_offsets_mapping=True)
        for s, e in sp_:
            toks = [k for k, (a, b) in enumerate(enc["offset_mapping"]) if a < e and b > s]
            assert seen[row] == bool(toks)
            if toks:
                np.testing.assert_allclose(P[row], lat[[k + 1 for k in toks]].max(0), rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(C[row], ctrl[[k + 1 for k in toks]].max(0), rtol=1e-4, atol=1e-5)
            row += 1
    assert row == len(P) and not seen.all() and seen.mean() > 0.5  # "quiz"/"zebra" lose letters, never all


def test_logit_profile_is_the_unembedding_restricted_to_shared_ids(tiny_llama):
    sae = make_sae()
    sp = SplicedSAE.build(tiny_llama, sae, HOOK, 1)
    ids = np.array([3, 7, 8, 21, 49])
    L = logit_profile(tiny_llama, sp.decoder, ids, chunk=5)
    full = unembed_directions(tiny_llama, sp.decoder).detach().numpy()  # [d_sae, d_vocab]
    np.testing.assert_allclose(L, full[:, ids].T, rtol=1e-6, atol=1e-6)


def test_planted_permuted_sae_is_recovered_with_minimal_p(tmp_path, tiny_llama):
    sae_a = make_sae(d_sae=24)
    perm = np.random.default_rng(5).permutation(24)
    inv = np.argsort(perm)  # A's latent i is B's latent inv[i]
    ta = save_sae(sae_a, tmp_path / "a", "tiny")
    tb = save_sae(permuted(sae_a, perm), tmp_path / "b", "tiny")
    side = make_side("tiny", tiny_llama)
    out = outputs(tmp_path / "out")
    head = feature_matching(CFG, training_a=ta, training_b=tb, sides=(side, side), texts=random_texts(40),
                                n_top=5, **out)
    doc = json.loads(out["matching"].read_text())
    p_min = 1 / (1 + CFG["n_permutations"])
    for kind in ("activation", "logit"):
        b = doc[kind]
        assert b["n_live_a"] == b["n_live_b"] > 12
        assert [inv[i] for i in b["features_a"]] == b["best_b"]
        pairs = dict(zip(b["pairs"]["a"], b["pairs"]["b"]))
        assert all(pairs[i] == inv[i] for i in b["features_a"])
        np.testing.assert_allclose(b["pairs"]["corr"], 1.0, atol=1e-5)
        np.testing.assert_allclose(b["p_value"], p_min)
        assert b["n_matched"] == b["n_live_a"] and b["threshold"] < 0.99
        assert max(b["control"]["best_corr"]) < 0.99  # random directions never reach the planted 1.0
        assert b["n_p_min"] == b["n_live_a"]
        assert set(b["excluded_features_b"]) == {int(inv[i]) for i in b["excluded_features_a"]}
        top = b["top_pairs"][0]
        assert top["tokens_a"] == top["tokens_b"] and top["words_a"] == top["words_b"]
        other = "logit" if kind == "activation" else "activation"
        assert top[f"corr_{other}"] == pytest.approx(1.0, abs=1e-5)
    assert doc["vocabulary"]["n_shared"] == 49  # every string but the special BOS
    for kind in ("activation", "logit"):
        # 14 word types / 49 tokens in a 32-dim space: random directions of the same model also beat
        # the row-shuffling null, but only the planted latents beat the control's own q0.99
        c = doc[kind]["control"]
        assert c["n_matched"] > 5 and c["n_matched_above_control"] == doc[kind]["n_live_a"]
    assert doc["agreement"]["n_same_pairs"] == doc["agreement"]["n_same_pairs_matched_in_both"] \
        == doc["activation"]["n_live_a"]  # every activation pair is also the logit pair
    assert head["activation_matched"] == doc["activation"]["n_matched"]
    assert out["summary"].read_text().startswith("# Cross-model SAE feature matching")
    assert out["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in out.values())


def test_unrelated_models_and_saes_give_few_matches(tmp_path):
    model_a = make_tiny_llama(seed=0)
    model_b = make_tiny_llama(n_layers=3, d_model=48, n_heads=4, n_kv=2, d_mlp=96, seed=1)
    vocab_b = [VOCAB[i] for i in np.random.default_rng(9).permutation(50)]  # same strings, other ids
    ta = save_sae(make_sae(32, 64, seed=1), tmp_path / "a", "A")
    tb = save_sae(make_sae(48, 48, seed=2), tmp_path / "b", "B", hook="blocks.1.hook_resid_post")
    out = outputs(tmp_path / "out")
    feature_matching({**CFG, "n_permutations": 99}, training_a=ta, training_b=tb,
                         sides=(make_side("A", model_a), make_side("B", model_b, vocab_b)),
                         texts=random_texts(60, seed=1), **out)
    doc = json.loads(out["matching"].read_text())
    assert doc["vocabulary"]["n_shared"] == 49 and doc["hook_b"] == "blocks.1.hook_resid_post"
    # logit profiles of independent random models: a true null, ~1% of 64 latents above q0.99
    assert doc["logit"]["n_live_a"] == 64 and doc["logit"]["n_matched"] <= 3
    assert doc["logit"]["n_p_min"] <= 3
    # activations: both models read the same 14 word types, so any two functions of the input beat
    # the row-shuffling null (here ~40% of latents "match"); the control (random sparse directions
    # of B) reproduces that count, so a random SAE matches no better than random directions
    act = doc["activation"]
    assert act["control"]["k"] == 6  # B's TopK SAE has L0 = k = 6 on every token
    assert act["n_matched"] <= 1.5 * act["control"]["n_matched"] + 3
    assert act["control"]["n_matched"] > 5 * act["n_expected_by_chance"]
    assert doc["logit"]["control"]["n_matched"] <= 4


def test_missing_sae_folder_is_a_clear_error(tmp_path, tiny_llama):
    ta = save_sae(make_sae(), tmp_path / "a", "tiny")
    side = make_side("tiny", tiny_llama)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope")) + ".*train_sae"):
        feature_matching(CFG, training_a=ta, training_b=tmp_path / "nope" / "training.json",
                             sides=(side, side), texts=random_texts(5), **outputs(tmp_path / "out"))
    # the rule path fails before loading any model
    with pytest.raises(DataError, match="train_sae"):
        feature_matching(CFG, training_a=tmp_path / "nope" / "training.json", training_b=ta,
                             model_cfg_a={"name": "smollm2_135m"}, model_cfg_b={"name": "gemma3_270m"},
                             texts=random_texts(5), **outputs(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_sae_of_another_model_and_bad_config_are_refused(tmp_path, tiny_llama):
    ta = save_sae(make_sae(), tmp_path / "a", "other_model")
    side = make_side("tiny", tiny_llama)
    with pytest.raises(ConfigError, match="other_model"):
        feature_matching(CFG, training_a=ta, training_b=ta, sides=(side, side), texts=random_texts(5),
                             **outputs(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"feature_matching\.null_kind"):
        feature_matching({"null_kind": "bogus"}, training_a=ta, training_b=ta, sides=(side, side),
                             texts=random_texts(5), **outputs(tmp_path / "out"))


def _items(prompts: list[str]) -> list[TaskItem]:
    return [TaskItem(id=i, prompt=p, corrupted_prompt=p, answer=" a", wrong_answer=" b", template=None,
                     clean_ids=[1, 2], corrupted_ids=[1, 3], answer_id=4, wrong_id=5, good_ids=[4], bad_ids=[5])
            for i, p in enumerate(prompts)]


def test_shared_texts_union_of_prompts_and_corpus_passages(tmp_path):
    meta = {"task": "ioi", "kind": "ioi", "metric": "logit_diff"}
    da = tmp_path / "a" / "tasks" / "ioi" / "dataset.jsonl"
    db = tmp_path / "b" / "tasks" / "ioi" / "dataset.jsonl"
    write_dataset(da, _items(["one two three", "four five"]), meta)
    write_dataset(db, _items(["four five", "six seven eight nine"]), meta)
    doc = tmp_path / "corpus.txt"
    doc.write_text(" ".join(f"w{i}" for i in range(25)) + "\n\nlast  words here")
    corpus = {"name": "t", "source": "text_files", "paths": [str(doc)]}
    st = shared_texts([da], [db], corpus, task_words=100, corpus_words=22, passage_words=10, seed=0)
    prompts = [t for t, s in zip(st.texts, st.sources) if s == "task:ioi"]
    assert sorted(prompts) == ["four five", "one two three", "six seven eight nine"]  # union, once each
    passages = [t for t, s in zip(st.texts, st.sources) if s == "corpus"]
    assert [len(word_spans(p)) for p in passages] == [10, 10, 2]
    assert passages[0] == " ".join(f"w{i}" for i in range(10))
    small = shared_texts([da], [db], None, task_words=5, corpus_words=0, passage_words=10, seed=0)
    assert sum(len(word_spans(t)) for t in small.texts) <= 5 and small.n_prompts_available == 3
    assert corpus_passages(["a b", "c d e"], max_words=4, passage_words=2) == ["a b", "c d"]
    assert corpus_passages(["a b", "c d e f g"], max_words=4, passage_words=2, stride=2) == ["a b", "e f"]
    with pytest.raises(DataError, match="no shared texts"):
        shared_texts([da], [db], None, task_words=0, corpus_words=0, passage_words=10, seed=0)


def test_rarely_active_latents_are_left_out_of_the_matching():
    from mechflow.features.config import FeatureMatchingConfig
    from mechflow.features.profile_match import match_profile

    rng = np.random.default_rng(0)
    P = rng.exponential(size=(50, 6)) * (rng.random((50, 6)) < 0.5)
    P[:, 1] = 0.0
    P[[3, 7], 1] = 1.0  # active on 2 words: its correlation with any 2-row partner would be ~1
    P[:, 4] = 0.0  # dead
    cfg = FeatureMatchingConfig.from_dict({"n_permutations": 9})
    pm = match_profile("activation", P, P, cfg, np.random.default_rng(1), min_active=5)
    assert pm.live_a.tolist() == pm.live_b.tolist() == [0, 2, 3, 5]
    assert match_profile("activation", P, P, cfg, np.random.default_rng(1)).live_a.tolist() == [0, 1, 2, 3, 5]
    with pytest.raises(DataError, match="at least 60"):
        match_profile("activation", P, P, cfg, np.random.default_rng(1), min_active=60)
