"""The `steer` stage against exact references on tiny models: alpha = 0 and an unchanged feature are
bit-identical, a planted direction is recovered, clamps equal hand-computed edits, padded scoring equals
unpadded runs, the sweep's bookkeeping on hand cases, records that validate against their schemas."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from mechflow.contracts.documents import check_document
from mechflow.contracts.steer import ActivationRecord, InterventionRecord, SteerSummary
from mechflow.corpus.core import contexts_table
from mechflow.errors import ConfigError, DataError
from mechflow.steer.directions import (
    auc,
    contrast_direction,
    fit_probe,
    probe_accuracy,
    residual_activations,
    scan_layers,
)
from mechflow.steer.interventions import Dictionary, Intervention, dictionary_attribution, sae_dictionary
from mechflow.steer.measure import (
    Baseline,
    PromptSet,
    Scores,
    choose,
    percentile,
    reaches,
    score,
    strongest,
    target_effect,
    weakest_reaching,
)
from mechflow.steer.stage import split, steer
from mechflow.tasks.dataset import TaskDataset, TaskItem, make_batch, write_dataset
from mechflow.testing import make_tiny_llama, make_tiny_sae

REPO = Path(__file__).resolve().parents[3]
SAE_HOOK = "blocks.0.hook_resid_post"
PAIRS = [(10 + i, 30 + i) for i in range(12)]  # (positive, negative) last tokens


@pytest.fixture(scope="module")
def planted():
    """A tiny llama whose positive last tokens embed as their negative partner plus a planted v."""
    model = make_tiny_llama(n_layers=2, d_model=32, d_vocab=50, seed=3)
    v = torch.randn(32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        for p, q in PAIRS:
            model.W_E[p] = model.W_E[q] + v
    return model, v


def items(n=12, seed=0, lengths=(5, 6, 7)) -> list[TaskItem]:
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, q = PAIRS[i % len(PAIRS)]
        prefix = g.integers(2, 9, size=lengths[i % len(lengths)]).tolist()
        out.append(TaskItem(id=i, prompt=f"p{i}", corrupted_prompt=f"c{i}", answer=" a", wrong_answer=" b",
                            template=None, clean_ids=prefix + [p], corrupted_ids=prefix + [q], answer_id=3 + i % 5,
                            wrong_id=40 + i % 5, good_ids=[3 + i % 5], bad_ids=[40 + i % 5]))
    return out


def write_task(folder: Path, name: str, n=12, seed=0) -> Path:
    path = folder / name / "dataset.jsonl"
    path.parent.mkdir(parents=True)
    write_dataset(path, items(n, seed), {"task": name, "kind": "jsonl", "metric": "logit_diff",
                                         "tokenizer": {"model": "tiny"}})
    return path


@pytest.fixture
def run_files(tmp_path):
    tasks = tmp_path / "tasks"
    main = write_task(tasks, "t", 12, 0)
    other = write_task(tasks, "u", 6, 1)
    tokens = tmp_path / "tokens.parquet"
    pq.write_table(contexts_table(np.random.default_rng(0).integers(0, 50, size=(3, 12))), tokens)
    sae = make_tiny_sae(32, 24, "topk", seed=1)
    sae.cfg.metadata.hook_name = SAE_HOOK
    folder = tmp_path / "sae"
    sae.save_model(folder)
    (folder / "training.json").write_text(json.dumps({"exclude_bos": False, "hook": SAE_HOOK}))
    return {"dataset": main, "datasets": [main, other], "tokens": tokens, "sae_training": [folder / "training.json"]}


def outputs(folder: Path) -> dict:
    return {"summary": folder / "summary.json", "interventions": folder / "interventions.jsonl",
            "activations": folder / "activations.jsonl", "directions": folder / "directions.safetensors",
            "layers_figure": folder / "layers.png", "sweep_figure": folder / "sweep.png",
            "generations": folder / "generations.md"}


CFG = {"alphas": [-2.0, -1.0, 1.0], "feature_scales": [0.0, 2.0], "n_features": 2, "n_random": 4,
       "corpus_contexts": 2, "corpus_tokens": 8, "other_prompts": 4, "n_generations": 1, "max_new_tokens": 3,
       "heldout_fraction": 0.5, "target_effect": -0.1, "max_negative_kl": 10.0, "max_ce_increase": 10.0,
       "max_other_task_change": 10.0}


def test_alpha_zero_and_unchanged_feature_are_bit_identical(planted):
    model, v = planted
    tokens = torch.tensor([it.clean_ids for it in items(4, lengths=(6,))])
    ref = model(tokens)
    for positions in ("last", "all"):
        iv = Intervention("contrast", "c", "blocks.1.hook_resid_pre", positions, "add", 0.0, 1, v)
        assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=iv.hooks()), ref)
    sae = make_tiny_sae(32, 24, "topk", seed=1)
    sae.cfg.metadata.hook_name = SAE_HOOK
    d = sae_dictionary(sae, Path("sae"), model, start=0)
    for f in range(3):
        iv = Intervention("sae_feature", f"sae:{f}", SAE_HOOK, "all", "scale", 1.0, 0, None, d, f, True, 0)
        assert torch.equal(model.run_with_hooks(tokens, fwd_hooks=iv.hooks()), ref)


def test_feature_clamps_equal_hand_computed_edits(planted):
    """With the error term: x + decode(a') - decode(a); without: decode(a') replaces x. At every
    position from `start` on (scale / set), against hooks written from SAELens' encode / decode."""
    model, _ = planted
    tokens = torch.tensor([it.clean_ids for it in items(4, lengths=(6,))])
    sae = make_tiny_sae(32, 24, "topk", seed=1)
    sae.cfg.metadata.hook_name = SAE_HOOK
    d = sae_dictionary(sae, Path("sae"), model, start=1)
    act = model.run_with_cache(tokens, names_filter=[SAE_HOOK])[1][SAE_HOOK]
    f = int(sae.encode(act[:, 1:]).sum((0, 1)).argmax())  # a latent that fires
    for op, alpha in (("scale", 0.0), ("scale", 3.0), ("set", 2.5), ("scale", 1.0)):
        for error_term in (True, False):
            iv = Intervention("sae_feature", f"sae:{f}", SAE_HOOK, "all", op, alpha, 0, None, d, f, error_term, 1)

            def hand(x, hook=None):
                a = sae.encode(x[:, 1:])
                a2 = a.clone()
                a2[..., f] = a[..., f] * alpha if op == "scale" else alpha
                out = x.clone()
                out[:, 1:] = (x[:, 1:] + sae.decode(a2) - sae.decode(a)) if error_term else sae.decode(a2)
                return out

            got = model.run_with_hooks(tokens, fwd_hooks=iv.hooks())
            want = model.run_with_hooks(tokens, fwd_hooks=[(SAE_HOOK, hand)])
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # clamping to its own activation without the error term = the SAE spliced in (the reconstruction error)
    iv = Intervention("sae_feature", "s", SAE_HOOK, "all", "scale", 1.0, 0, None, d, f, False, 1)
    spliced = model.run_with_hooks(tokens, fwd_hooks=[(SAE_HOOK, lambda x, hook=None: torch.cat(
        [x[:, :1], sae.decode(sae.encode(x[:, 1:]))], 1))])
    torch.testing.assert_close(model.run_with_hooks(tokens, fwd_hooks=iv.hooks()), spliced, rtol=0, atol=1e-10)


def test_transcoder_style_clamp_edits_the_output_hook_from_the_input_hook(planted):
    model, _ = planted
    tokens = torch.tensor([it.clean_ids for it in items(3, lengths=(6,))])
    g = torch.Generator().manual_seed(0)
    W_enc, W_dec = torch.randn(32, 8, generator=g, dtype=torch.float64), torch.randn(8, 32, generator=g,
                                                                                     dtype=torch.float64)
    d = Dictionary("transcoder", "tc", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", 1,
                   lambda x: torch.relu(x @ W_enc), lambda a, x: a @ W_dec, W_dec)
    _, cache = model.run_with_cache(tokens, names_filter=[d.hook_in, d.hook_out])
    a = torch.relu(cache[d.hook_in] @ W_enc)
    f = int(a[:, 1:].sum((0, 1)).argmax())
    iv = Intervention("transcoder_feature", "tc:f", d.hook_out, "last", "set", 5.0, 1, None, d, f, True, 1)
    delta = torch.zeros_like(cache[d.hook_out])
    delta[:, -1] = (5.0 - a[:, -1, f])[:, None] * W_dec[f]  # (a' - a) W_dec[f] at the last position only
    hand = [(d.hook_out, lambda x, hook=None: x + delta)]
    torch.testing.assert_close(model.run_with_hooks(tokens, fwd_hooks=iv.hooks()),
                               model.run_with_hooks(tokens, fwd_hooks=hand), rtol=0, atol=1e-10)


def _tc_dictionary(seed=0, start=1):
    g = torch.Generator().manual_seed(seed)
    W_enc, W_dec = torch.randn(32, 8, generator=g, dtype=torch.float64), torch.randn(8, 32, generator=g,
                                                                                     dtype=torch.float64) * 0.3
    return Dictionary("transcoder", "tc", "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out", start,
                      lambda x: torch.relu(x @ W_enc), lambda a, x: a @ W_dec, W_dec)


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_attribution_is_the_derivative_of_the_scale_clamp(planted, kind):
    """attribution_i = dm/dk at k = 1 of a_i -> k a_i (error term kept), by central finite differences;
    for the SAE also equal to the features stage's attribution patching (zero ablation)."""
    model, _ = planted
    its = items(6, lengths=(6,))
    batch = make_batch(its, "logit_diff")
    if kind == "sae":
        sae = make_tiny_sae(32, 24, "topk", seed=1)
        sae.cfg.metadata.hook_name = SAE_HOOK
        d = sae_dictionary(sae, Path("sae"), model, start=1)
    else:
        d = _tc_dictionary()
    attr = dictionary_attribution(model, d, [batch])
    eps = 1e-5
    with torch.no_grad():
        for f in torch.argsort(attr.abs(), descending=True)[:4].tolist():
            m = []
            for k in (1 + eps, 1 - eps):
                iv = Intervention("x", "x", d.hook_out, "all", "scale", k, 0, None, d, f, True, 1)
                m.append(batch.metric(model.run_with_hooks(batch.clean_tokens, fwd_hooks=iv.hooks())).mean())
            assert float((m[0] - m[1]) / (2 * eps)) == pytest.approx(float(attr[f]), rel=1e-5, abs=1e-8)
    if kind == "sae":
        from mechflow.features.attribution import SplicedSAE, feature_attribution

        fa = feature_attribution(SplicedSAE.build(model, sae, SAE_HOOK, 1, True), batch, "zero")
        torch.testing.assert_close(attr, fa.per_prompt.double().mean(0), rtol=1e-9, atol=1e-12)


def test_planted_direction_is_recovered(planted):
    model, v = planted
    its = items(12)
    pos = torch.cat([residual_activations(model, torch.tensor([it.clean_ids]), [0, 1], "last", 0) for it in its], 1)
    neg = torch.cat([residual_activations(model, torch.tensor([it.corrupted_ids]), [0, 1], "last", 0)
                     for it in its], 1)
    d = contrast_direction(pos[0], neg[0])
    assert float(torch.nn.functional.cosine_similarity(d, v, dim=0)) > 0.99
    scan = scan_layers([0, 1], pos[:, :6], neg[:, :6], pos[:, 6:], neg[:, 6:], l2=0.01)
    assert scan.rows[0]["auc"] == 1.0 and scan.rows[0]["probe_accuracy"] == 1.0


def test_auc_and_probe_on_hand_cases():
    assert auc(np.array([2.0, 3.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)  # (1 + 1 + 0.5 + 1) / 4
    assert auc(np.array([1.0]), np.array([1.0])) == 0.5
    x = torch.tensor([[0.0, 1.0], [0.2, 1.5], [3.0, 0.0], [2.5, -1.0]], dtype=torch.float64)
    y = torch.tensor([0.0, 0.0, 1.0, 1.0])
    probe = fit_probe(x, y, l2=0.0)
    assert probe_accuracy(probe, x, y) == 1.0


def test_padded_scoring_equals_unpadded_runs(planted):
    model, v = planted
    its = items(9, lengths=(4, 6, 9))
    ps = PromptSet("t", "positive", "x", "sha", "logit_diff", its)
    iv = Intervention("contrast", "c", "blocks.1.hook_resid_pre", "last", "add", 1.5, 1, v)
    got = score(model, ps, iv)
    for i, it in enumerate(its):
        b = make_batch([it], "logit_diff")
        want = b.metric(model.run_with_hooks(b.clean_tokens, fwd_hooks=iv.hooks())).detach()
        assert float(got.metric[i]) == pytest.approx(float(want[0]), abs=1e-9)
    assert len(ps.padded(64)) == 1


def _base(pos, neg):
    t = torch.tensor
    return Baseline(Scores(t(pos, dtype=torch.float64), torch.zeros(len(pos), 2)),
                    Scores(t(neg, dtype=torch.float64), torch.zeros(len(neg), 2)), {})


def test_target_effect_bookkeeping_by_hand():
    base = _base([2.0, 4.0], [0.0, 0.0])  # gap 3
    after = Scores(torch.tensor([-1.0, 1.0], dtype=torch.float64), torch.zeros(2, 2))
    t = target_effect(base, after)
    assert t["effect"] == pytest.approx(-3.0) and t["normalized_effect"] == pytest.approx(-1.0)
    assert t["accuracy_before"] == 1.0 and t["accuracy_after"] == 0.5 and t["flip_rate"] == 0.5


def test_choose_weakest_strength_within_bounds_by_hand():
    rows = [{"alpha": a, "strength": abs(a), "normalized_effect": e, "within_bounds": ok, "failed": f}
            for a, e, ok, f in ((-4.0, -0.9, False, ["corpus CE"]), (-2.0, -0.6, True, []),
                                (-1.0, -0.55, True, []), (-0.5, -0.2, True, []), (1.0, 0.3, True, []))]
    chosen, why = choose(rows, -0.5)
    assert chosen["alpha"] == -1.0 and "weakest" in why
    none, why = choose(rows, -0.95)
    assert none is None and "-0.9" in why
    rows[1]["within_bounds"] = rows[2]["within_bounds"] = False
    rows[1]["failed"] = rows[2]["failed"] = ["KL"]
    none, why = choose(rows, -0.5)
    assert none is None and "broke a side-effect bound" in why and "alpha -4" in why
    assert strongest(rows, -0.5)["alpha"] == -4.0 and strongest(rows, 0.5)["alpha"] == 1.0
    assert weakest_reaching(rows, -0.5)["alpha"] == -1.0 and weakest_reaching(rows, -0.95) is None
    assert reaches(-0.5, -0.5) and not reaches(-0.4, -0.5) and reaches(0.6, 0.5)
    assert percentile(-0.5, [-0.6, -0.1, 0.0, 0.2], -0.5) == 75.0
    assert percentile(0.5, [-0.6, 0.6], 0.5) == 50.0


def test_split_is_seeded_disjoint_and_keeps_two_each():
    train, held = split(list(range(10)), 0.5, 0)
    assert sorted(train + held) == list(range(10)) and len(held) == 5
    assert (train, held) == split(list(range(10)), 0.5, 0)
    train, held = split(list(range(4)), 0.9, 1)
    assert len(train) == 2 and len(held) == 2


def test_stage_end_to_end_records_validate_and_polars_reads_them(planted, run_files, tmp_path):
    model, v = planted
    out = outputs(tmp_path / "steer")
    result = steer({**CFG, "layers": [0, 1]}, model=model, run="tiny", **run_files, **out)
    for p in out.values():
        assert p.exists(), p
    from safetensors.torch import load_file

    dirs = load_file(out["directions"])
    assert dirs["contrast"].shape == (2, 32)
    assert float(torch.nn.functional.cosine_similarity(dirs["contrast"][0].double(), v, dim=0)) > 0.99
    summary = json.loads(out["summary"].read_text())
    check_document(SteerSummary, summary)
    assert summary["chosen_layer"] in (0, 1) and len(summary["layers"]) == 2
    records = [json.loads(line) for line in out["interventions"].read_text().splitlines()]
    schema = json.loads((REPO / "workflow/schemas/contracts/steer_record.schema.json").read_text())
    for r in records:
        jsonschema.validate(r, schema)
        check_document(InterventionRecord, r)
    kinds = {r["intervention"]["kind"] for r in records}
    assert {"contrast", "random", "shuffled", "sae_feature"} <= kinds
    contrast = [r for r in records if r["intervention"]["kind"] == "contrast"]
    assert [r["intervention"]["alpha"] for r in contrast] == CFG["alphas"]
    # the chosen flag, the summary and the choice rule agree
    sweep = summary["interventions"][0]
    chosen = [r for r in contrast if r["chosen"]]
    rows = [{"alpha": r["intervention"]["alpha"], "strength": r["intervention"]["strength"],
             "normalized_effect": r["target"]["normalized_effect"], "within_bounds": r["within_bounds"],
             "failed": r["failed_bounds"]} for r in contrast]
    pick, _ = choose(rows, CFG["target_effect"])
    assert (pick["alpha"] if pick else None) == sweep["chosen_alpha"] == (chosen[0]["intervention"]["alpha"]
                                                                         if chosen else None)
    # every per-prompt list is recomputable: after - before averages to the effect
    for r in contrast:
        t = r["target"]
        assert np.mean(np.subtract(t["after"], t["before"])) == pytest.approx(t["effect"])
        assert t["normalized_effect"] == pytest.approx(t["effect"] / t["gap"])
        assert r["side_effects"]["other_tasks"][0]["task"] == "u"
    frame = pl.read_ndjson(out["interventions"])
    assert frame.height == len(records) == result["n_records"]
    acts = pl.read_ndjson(out["activations"])
    assert acts.height == result["n_activation_records"] > 0
    for row in acts.head(3).to_dicts():
        check_document(ActivationRecord, row)
    assert "unsteered" in out["generations"].read_text()


def test_bad_inputs_are_clear_errors_with_no_partial_output(planted, run_files, tmp_path):
    model, _ = planted
    out = outputs(tmp_path / "steer")
    with pytest.raises(ConfigError, match=r"steer.layers"):
        steer({**CFG, "layers": [0, 7]}, model=model, **run_files, **out)
    with pytest.raises(ConfigError, match=r"steer.contrast_file"):
        steer({**CFG, "contrast_file": str(tmp_path / "nope.jsonl")}, model=model, **run_files, **out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "maybe"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1"):
        steer({**CFG, "contrast_file": str(bad)}, model=model, **run_files, **out)
    with pytest.raises(ConfigError, match=r"steer.alphas"):
        steer({**CFG, "alphas": []}, model=model, **run_files, **out)
    small = write_task(tmp_path / "small", "s", 3)
    with pytest.raises(DataError, match=r"at least 4"):
        steer(CFG, model=model, **{**run_files, "dataset": small}, **out)
    assert not (tmp_path / "steer").exists() or not any((tmp_path / "steer").iterdir())
    assert TaskDataset.load(run_files["dataset"]).name == "t"


def test_contrast_file_direction_is_learned_from_its_texts(run_files, tmp_path):
    """A `contrast_file` of labelled texts (tokenized by the model's tokenizer) replaces the task's pairs:
    positives end in words whose embeddings are a shared vector plus a planted v, negatives in words
    embedded as the shared vector, so the layer-0 difference of means is v whatever the split."""
    from task_helpers import word_level_tokenizer

    words = [f"w{i}" for i in range(40)]
    hf = word_level_tokenizer(words, split_digit_pairs=False)
    model = make_tiny_llama(n_layers=2, d_model=32, d_vocab=50, seed=4)
    hf.pad_token = "[UNK]"
    model.tokenizer = hf  # set_tokenizer would reload it by name; TL's to_tokens only calls it
    g = torch.Generator().manual_seed(9)
    v, u = (torch.randn(32, generator=g, dtype=torch.float64) for _ in range(2))
    pos_words, neg_words = words[10:20], words[20:30]
    with torch.no_grad():
        for w in neg_words:
            model.W_E[hf.convert_tokens_to_ids(w)] = u
        for w in pos_words:
            model.W_E[hf.convert_tokens_to_ids(w)] = u + v
    rows = [{"text": f"w1 w{2 + i % 5} {w}", "label": "positive"} for i, w in enumerate(pos_words)]
    rows += [{"text": f"w3 w{4 + i % 3} {w}", "label": "negative"} for i, w in enumerate(neg_words)]
    contrast = tmp_path / "contrast.jsonl"
    contrast.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = outputs(tmp_path / "steer")
    steer({**CFG, "layers": [0, 1], "layer": 0, "contrast_file": str(contrast), "n_features": 0,
           "n_transcoder_features": 0, "n_generations": 0}, model=model, **run_files, **out)
    summary = json.loads(out["summary"].read_text())
    assert "contrast.jsonl" in summary["direction_source"] and summary["chosen_layer"] == 0
    assert summary["layers"][0]["auc"] == 1.0
    from safetensors.torch import load_file

    d = load_file(out["directions"])["contrast"][0].double()
    assert float(torch.nn.functional.cosine_similarity(d, v, dim=0)) > 0.99
