"""Dataset files, buckets, metrics against hand computations, verdicts, and both stages end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from task_helpers import word_level_tokenizer

from mechflow.contracts.models import ModelCard
from mechflow.errors import DataError, IntegrityError
from mechflow.models import LoadedModel
from mechflow.tasks import TaskDataset, TaskItem, evaluate_task, final_logits, make_batch, meta_path_of, prepare_task
from mechflow.tasks.baseline import Scores, summarize
from mechflow.tasks.dataset import write_dataset


def _item(i, n_tokens, good, bad, answer=None, wrong=None):
    ids = list(range(2, 2 + n_tokens))
    return TaskItem(id=i, prompt=f"p{i}", corrupted_prompt=f"c{i}", answer="a", wrong_answer="w", template=None,
                    clean_ids=ids, corrupted_ids=ids[::-1], answer_id=answer if answer is not None else good[0],
                    wrong_id=wrong if wrong is not None else bad[0], good_ids=good, bad_ids=bad)


def test_logit_diff_matches_hand_computation():
    batch = make_batch([_item(0, 3, [1], [3]), _item(1, 3, [4], [0])], "logit_diff")
    logits = torch.tensor([[[9.0] * 5, [9.0] * 5, [0.5, 2.0, -1.0, 0.25, 3.0]],
                           [[9.0] * 5, [9.0] * 5, [1.5, 0.0, 0.0, 0.0, -2.0]]])
    assert batch.metric(logits).tolist() == [2.0 - 0.25, -2.0 - 1.5]
    assert batch.metric(logits[:, -1]).tolist() == [1.75, -3.5]  # [n, vocab] input too
    assert batch.correct(logits).tolist() == [True, False]


def test_prob_diff_matches_hand_computation_with_padding():
    batch = make_batch([_item(0, 2, [2, 3], [0]), _item(1, 2, [1], [4])], "prob_diff")
    assert batch.target_ids.shape == (2, 3) and batch.target_signs[1].tolist() == [1.0, -1.0, 0.0]
    row0, row1 = [0.0, 1.0, 2.0, 3.0, 4.0], [1.0, -1.0, 0.5, 0.0, 2.0]
    logits = torch.tensor([[row0, row0], [row1, row1]], dtype=torch.float64)

    def p(row, i):
        return math.exp(row[i]) / sum(math.exp(x) for x in row)

    want = [p(row0, 2) + p(row0, 3) - p(row0, 0), p(row1, 1) - p(row1, 4)]
    assert batch.metric(logits).tolist() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("kind", ["logit_diff", "prob_diff"])
def test_metric_is_differentiable(kind):
    batch = make_batch([_item(0, 2, [2, 3], [0]), _item(1, 2, [1], [4])], kind)
    logits = torch.randn(2, 2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: batch.metric(x), (logits,))


def test_write_load_roundtrip_buckets_and_integrity(tmp_path):
    items = [_item(0, 3, [1], [2]), _item(1, 5, [1], [2]), _item(2, 3, [3], [4]), _item(3, 4, [1], [2])]
    path = tmp_path / "dataset.jsonl"
    write_dataset(path, items, {"task": "t", "kind": "jsonl", "metric": "logit_diff"})
    assert meta_path_of(path).name == "dataset.meta.json"
    ds = TaskDataset.load(path)
    assert ds.examples == items and ds.metric_kind == "logit_diff"
    buckets = ds.buckets()
    assert [b.clean_tokens.shape for b in buckets] == [(2, 3), (1, 4), (1, 5)]
    assert [b.example_ids for b in buckets] == [[0, 2], [3], [1]]
    assert all(b.clean_tokens.shape == b.corrupted_tokens.shape for b in buckets)
    assert [b.example_ids for b in ds.buckets(max_batch=1)] == [[0], [2], [3], [1]]
    path.write_text(path.read_text().replace('"p0"', '"P0"'))
    with pytest.raises(IntegrityError, match="sha256"):
        TaskDataset.load(path)
    meta_path_of(path).unlink()
    with pytest.raises(DataError, match="meta.json"):
        TaskDataset.load(path)


def test_unequal_lengths_are_rejected():
    with pytest.raises(DataError, match="3 tokens, corrupted prompt 2"):
        TaskItem(id=0, prompt="", corrupted_prompt="", answer="", wrong_answer="", template=None,
                 clean_ids=[1, 2, 3], corrupted_ids=[1, 2], answer_id=1, wrong_id=2, good_ids=[1], bad_ids=[2])


def _ds(n, kind="logit_diff"):
    return TaskDataset("t", "ioi", kind, [_item(i, 3, [1], [2]) for i in range(n)], {})


def test_verdicts():
    good = summarize(_ds(32), Scores(list(range(32)), [2.0] * 30 + [-1.0] * 2, [0.1] * 32))
    assert good["verdict"] == "above chance" and good["accuracy"] == 30 / 32 and good["chance_accuracy"] == 0.5
    coin = summarize(_ds(32), Scores(list(range(32)), [1.0, -1.0] * 16, [0.0] * 32))
    assert coin["verdict"].startswith("FAILS: accuracy 0.500 is not above chance 0.500")
    no_signal = summarize(_ds(32), Scores(list(range(32)), [2.0] * 32, [3.0] * 32))
    assert no_signal["verdict"].startswith("FAILS: clean beats corrupted on only 0/32")
    few = summarize(_ds(4), Scores(list(range(4)), [2.0] * 4, [-1.0] * 4))  # 4/4 right, p = 1/16
    assert few["verdict"].startswith("INCONCLUSIVE") and "p=0.0625" in few["verdict"]


def test_final_logits_equal_the_full_forward(tiny_llama):
    tokens = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(final_logits(tiny_llama, tokens), tiny_llama(tokens)[:, -1], atol=1e-12)


def test_prepare_and_evaluate_end_to_end_on_tiny_llama(tmp_path, tiny_llama):
    words = ["a", "b", "c", "d", "e", "f", "g", "h"]
    hf = word_level_tokenizer(words, split_digit_pairs=False)
    lines = [{"prompt": "a b c", "corrupted_prompt": "a b d", "answer": " e", "wrong_answer": " f"},
             {"prompt": "a b c d", "corrupted_prompt": "h g f e", "answer": " g", "wrong_answer": " h"},
             {"prompt": "c b a", "corrupted_prompt": "c c a", "answer": " f", "wrong_answer": " e"}]
    src = tmp_path / "ex.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = {"name": "mine", "kind": "jsonl", "n_prompts": 10, "seed": 0, "path": str(src), "batch_size": 2}
    model_cfg = {"name": "tiny", "prepend_bos": True, "bos_token": "[BOS]"}
    dataset = tmp_path / "out" / "dataset.jsonl"
    meta = prepare_task(cfg, model_cfg=model_cfg, dataset=dataset, tokenizer=hf)
    assert meta["n_examples"] == 3 and meta["tokenizer"]["bos_token_id"] == 1 and meta["token_lengths"] == [4, 5]
    card = ModelCard(name="tiny", architecture="llama", n_layers=2, n_heads=4, d_model=32, d_mlp=64, d_vocab=50,
                     source="conftest", dtype="float64", bos_token_id=1, prepend_bos=True)
    loaded = LoadedModel(model=tiny_llama, tokenizer=hf, card=card, load_seconds=0.0)
    baseline = tmp_path / "out" / "baseline.json"
    result = evaluate_task(cfg, model_cfg=model_cfg, dataset=dataset, baseline=baseline, model=loaded)
    assert json.loads(baseline.read_text())["per_prompt"] == result["per_prompt"]
    vocab = hf.get_vocab()
    for row, line in zip(result["per_prompt"], lines):
        for key, text in (("clean", line["prompt"]), ("corrupted", line["corrupted_prompt"])):
            ids = torch.tensor([[1] + [vocab[w] for w in text.split()]])
            logits = tiny_llama(ids)[0, -1]
            want = (logits[vocab[line["answer"].strip()]] - logits[vocab[line["wrong_answer"].strip()]]).item()
            assert row[key] == pytest.approx(want, abs=1e-9)
    # 3 prompts cannot reach p < 0.01
    assert result["n_prompts"] == 3 and result["verdict"].startswith(("FAILS", "INCONCLUSIVE"))
    other = {**model_cfg, "prepend_bos": False}
    with pytest.raises(DataError, match="prepend_bos"):
        evaluate_task(cfg, model_cfg=other, dataset=dataset, baseline=tmp_path / "b2.json",
                      model=LoadedModel(tiny_llama, hf, card.model_copy(update={"prepend_bos": False}), 0.0))
    with pytest.raises(DataError, match="different config"):
        evaluate_task({**cfg, "seed": 1}, model_cfg=model_cfg, dataset=dataset, baseline=tmp_path / "b3.json",
                      model=loaded)
    assert not (tmp_path / "b2.json").exists() and not (tmp_path / "b3.json").exists()


def test_a_prompt_longer_than_the_model_context_is_refused_with_no_output(tmp_path):
    words = ["a", "b", "c", "d", "e", "f", "g", "h"]
    hf = word_level_tokenizer(words, split_digit_pairs=False)
    lines = [{"prompt": "a b c", "corrupted_prompt": "a b d", "answer": " e", "wrong_answer": " f"},
             {"prompt": "a b c d a b c d", "corrupted_prompt": "h g f e h g f e", "answer": " g",
              "wrong_answer": " h"}]
    src = tmp_path / "ex.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = {"name": "mine", "kind": "jsonl", "n_prompts": 10, "seed": 0, "path": str(src), "batch_size": 2}
    dataset = tmp_path / "out" / "dataset.jsonl"
    model_cfg = {"name": "tiny", "prepend_bos": True, "bos_token": "[BOS]", "n_ctx": 6}
    with pytest.raises(DataError, match=r"task mine: .* 9 tokens, more than the context of tiny \(model.n_ctx = 6"):
        prepare_task(cfg, model_cfg=model_cfg, dataset=dataset, tokenizer=hf)
    assert not dataset.exists() and not meta_path_of(dataset).exists()
    assert prepare_task(cfg, model_cfg={**model_cfg, "n_ctx": 9}, dataset=dataset, tokenizer=hf)["n_examples"] == 2
