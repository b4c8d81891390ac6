"""Rules `analyze` / `causal_trace` end to end on the tiny llama, each number checked against a
direct recomputation (hooked reruns, brute force over the corpus, ROME's exact identities)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from mechflow.attribution.analyze import analyze
from mechflow.attribution.causal_trace import causal_trace, position_roles, subject_positions
from mechflow.attribution.causal_tracing import answer_probability
from mechflow.attribution.config import AnalysisConfig, AttributionConfig, CausalTracingConfig
from mechflow.attribution.neuron_contexts import corpus_top_contexts, neuron_contexts
from mechflow.attribution.planning import ANALYZE_OUTPUTS
from mechflow.corpus import contexts_table
from mechflow.errors import ConfigError, DataError
from mechflow.harvest import harvest
from mechflow.tasks import TaskDataset, make_batch
from mechflow.tasks.dataset import TaskItem, write_dataset
from mechflow.testing import make_tiny_llama

REPO = Path(__file__).resolve().parents[3]
MODEL_CFG = {"name": "tiny", "prepend_bos": True}
POS = 7
# Subject spans (clean vs corrupted differ there): 1-token subjects at 2, 2-token subjects at 2..3.
SPANS = [[2], [2, 3], [2], [2, 3], [2, 3], [2]]
CFG = {"n_prompts": 4, "ig_steps": 64, "ig_rtol": 0.01, "ig_atol": 1e-6, "top_neurons": 3,
       "contexts_per_neuron": 3, "context_window": 3, "context_tokens": 60, "context_batch": 4, "seed": 5}
CT_CFG = {"n_prompts": 4, "n_samples": 1, "window": 2, "seed": 7, "max_batch": 8}


def _items(kind_spans, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i, span in enumerate(kind_spans):
        clean = [1, *torch.randint(2, 50, (POS - 1,), generator=g).tolist()]
        corrupted = list(clean)
        for p in span:
            corrupted[p] = 2 + (clean[p] - 2 + 7) % 48  # a different id at each subject position
        ans, wrong = 3 + i, 20 + i
        items.append(TaskItem(id=i, prompt=f"p{i}", corrupted_prompt=f"c{i}", answer=f"a{i}", wrong_answer=f"w{i}",
                              template="t", clean_ids=clean, corrupted_ids=corrupted, answer_id=ans, wrong_id=wrong,
                              good_ids=[ans], bad_ids=[wrong]))
    # One example of another length: not in the bucket, so never used.
    items.append(TaskItem(id="other", prompt="o", corrupted_prompt="oc", answer="a", wrong_answer="w", template="t",
                          clean_ids=[1, 5, 6], corrupted_ids=[1, 7, 6], answer_id=3, wrong_id=4, good_ids=[3],
                          bad_ids=[4]))
    return items


def write_task(path: Path, kind: str = "factual_recall", spans=SPANS) -> Path:
    write_dataset(path, _items(spans), {"task": kind, "kind": kind, "metric": "logit_diff", "posable": True})
    return path


def write_corpus(path: Path, n=12, width=10) -> np.ndarray:
    ctx = np.random.default_rng(3).integers(2, 50, (n, width))
    ctx[:, 0] = 1
    pq.write_table(contexts_table(ctx), path)
    return ctx


def outputs(d: Path) -> dict:
    names = {"ablations": "ablations.parquet", "ablations_figure": "ablations.png", "saliency": "saliency.parquet",
             "saliency_figure": "saliency.png", "neurons": "neurons.parquet", "neurons_md": "neurons.md",
             "summary": "analysis.md"}
    return {k: d / v for k, v in names.items()}


@pytest.fixture(scope="module")
def model():
    m = make_tiny_llama(seed=2)
    with torch.no_grad():  # non-zero MLP biases, as real models have
        for block in m.blocks:
            block.mlp.b_out.copy_(torch.randn(block.mlp.b_out.shape, generator=torch.Generator().manual_seed(1),
                                              dtype=torch.float64) * 0.3)
    return m


@pytest.fixture(scope="module")
def run(tmp_path_factory, model):
    d = tmp_path_factory.mktemp("analysis")
    dataset = write_task(d / "dataset.jsonl")
    ctx = write_corpus(d / "tokens.parquet")
    ct = causal_trace(CT_CFG, model_cfg=MODEL_CFG, dataset=dataset, causal_tracing=d / "causal_tracing.parquet",
                      figure=d / "causal_tracing.png", task="factual_recall", loaded_model=model)
    out = outputs(d)
    summary = analyze(CFG, model_cfg=MODEL_CFG, dataset=dataset, tokens=d / "tokens.parquet", harvest_index=[],
                      causal_tracing=[d / "causal_tracing.parquet"], task="factual_recall", loaded_model=model,
                      **out)
    batch = TaskDataset.load(dataset).buckets()[-1]  # the length-7 bucket (6 prompts)
    return {"dir": d, "dataset": dataset, "ctx": ctx, "out": out, "summary": summary, "ct": ct, "bucket": batch}


def test_every_table_matches_its_contract(run):
    """Writers check their tables against `mechflow.contracts.parquet`; the files read back match too."""
    from mechflow.contracts.parquet import (
        ABLATIONS_SCHEMA,
        CAUSAL_TRACING_SCHEMA,
        NEURONS_SCHEMA,
        SALIENCY_SCHEMA,
        schema_mismatches,
    )

    for name, contract in (("ablations", ABLATIONS_SCHEMA), ("saliency", SALIENCY_SCHEMA),
                           ("neurons", NEURONS_SCHEMA), ("causal_tracing", CAUSAL_TRACING_SCHEMA)):
        assert schema_mismatches(pq.read_schema(run["dir"] / f"{name}.parquet"), contract) == [], name


def test_a_table_that_breaks_its_contract_is_refused_on_read(tmp_path):
    from mechflow.attribution.stage_io import read_table
    from mechflow.contracts.parquet import ABLATIONS_SCHEMA

    pl.DataFrame({"method": ["zero"]}).write_parquet(tmp_path / "ablations.parquet")
    with pytest.raises(DataError, match="ablations.parquet does not match its contract.*re-run rule analyze"):
        read_table(tmp_path / "ablations.parquet", ABLATIONS_SCHEMA, "analyze")


def _batch(n):
    """The first `n` prompts of the length-7 bucket, as `select_batch` picks them."""
    return make_batch(_items(SPANS)[:n], "logit_diff")


def test_every_output_is_written_with_its_columns(run):
    for path in [*run["out"].values(), run["dir"] / "causal_tracing.parquet", run["dir"] / "causal_tracing.png"]:
        assert path.exists() and path.stat().st_size > 0, path
    abl = pl.read_parquet(run["out"]["ablations"])
    assert abl.columns == ["method", "component", "kind", "layer", "head", "prompt", "score", "example_id",
                           "clean_metric", "reference"]
    assert (abl.filter(pl.col("method") == "resample")["reference"][0]
            == "a seeded draw from the 2 held-out bucket prompts")
    assert abl.height == 3 * (2 * 4 + 2) * 4  # 3 methods x (8 heads + 2 MLPs) x 4 prompts
    sal = pl.read_parquet(run["out"]["saliency"])
    assert {"method", "prompt", "position", "token_id", "score", "ig_completeness_residual", "ig_complete"} <= set(
        sal.columns)
    assert sal.group_by("method").len().sort("method")["len"].to_list() == [4 * POS] * 3
    neur = pl.read_parquet(run["out"]["neurons"])
    assert {"method", "rank", "layer", "neuron", "score", "dla_score", "ap_score", "context_rank", "activation",
            "context_token_ids", "context_source"} <= set(neur.columns)
    assert neur.height == 2 * 3 * 3  # 2 rankings x 3 neurons x 3 contexts
    ct = pl.read_parquet(run["dir"] / "causal_tracing.parquet")
    assert ct.height == 3 * 2 * POS * 4  # kinds x layers x positions x prompts
    text = run["out"]["summary"].read_text()
    for section in ("## Ablations", "## Token saliency", "## Neurons", "## Causal tracing"):
        assert section in text
    assert "L" in run["out"]["neurons_md"].read_text()


def test_integrated_gradients_is_complete_and_explains_the_metric_difference(run, model):
    sal = pl.read_parquet(run["out"]["saliency"])
    ig = sal.filter(pl.col("method") == "integrated_gradients").sort("prompt", "position")
    per = ig.unique("prompt").sort("prompt")
    assert per["ig_complete"].all()
    batch = _batch(4)
    with torch.no_grad():
        m_clean = batch.metric(model(batch.clean_tokens))
        m_corr = batch.metric(model(batch.corrupted_tokens))  # rotary: the embedding is the only token input
    np.testing.assert_allclose(per["metric"].to_numpy(), m_clean.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(per["baseline_metric"].to_numpy(), m_corr.numpy(), rtol=0, atol=1e-12)
    ig_sum = ig.group_by("prompt").agg(pl.col("score").sum()).sort("prompt")["score"].to_numpy()
    delta = (m_clean - m_corr).numpy()
    np.testing.assert_allclose(ig_sum - delta, per["ig_completeness_residual"].to_numpy(), rtol=0, atol=1e-12)
    assert np.all(np.abs(ig_sum - delta) <= 0.01 * np.abs(delta) + 1e-6)
    assert np.abs(delta).min() > 1e-3  # the check is not vacuous


def test_incomplete_integrated_gradients_fails_loudly_or_is_flagged(tmp_path, model):
    dataset = write_task(tmp_path / "dataset.jsonl")
    write_corpus(tmp_path / "tokens.parquet")
    strict = {**CFG, "ig_steps": 1, "ig_rtol": 0.0, "ig_atol": 1e-12, "ablations": []}
    with pytest.raises(DataError, match="integrated gradients is incomplete.*ig_steps"):
        analyze(strict, model_cfg=MODEL_CFG, dataset=dataset, tokens=tmp_path / "tokens.parquet",
                loaded_model=model, **outputs(tmp_path))
    assert not (tmp_path / "saliency.parquet").exists()
    summary = analyze({**strict, "ig_check": "flag"}, model_cfg=MODEL_CFG, dataset=dataset,
                      tokens=tmp_path / "tokens.parquet", loaded_model=model, **outputs(tmp_path))
    assert summary["ig_incomplete_prompts"] == 4
    assert "IG is incomplete" in (tmp_path / "analysis.md").read_text()
    assert pl.read_parquet(tmp_path / "ablations.parquet").height == 0


def _rerun(model, tokens, hook, edit):
    def fn(act, hook=None):
        return edit(act.clone())
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=[(hook, fn)])


def test_ablations_equal_a_direct_hooked_rerun(run, model):
    abl = pl.read_parquet(run["out"]["ablations"])
    batch, bucket = _batch(4), run["bucket"]
    toks = batch.clean_tokens
    with torch.no_grad():
        m_clean = batch.metric(model(toks))
        _, bucket_cache = model.run_with_cache(bucket.clean_tokens)

    def got(method, comp):
        return abl.filter((pl.col("method") == method) & (pl.col("component") == comp)).sort("prompt")["score"]

    # zero ablation of head 0.1
    def zero_h(act):
        act[:, :, 1] = 0
        return act
    ref = batch.metric(_rerun(model, toks, "blocks.0.attn.hook_z", zero_h)) - m_clean
    np.testing.assert_allclose(got("zero", "a0.h1").to_numpy(), ref.numpy(), rtol=0, atol=1e-12)
    # mean ablation of head 1.2: the mean over the whole bucket (6 prompts) at each position
    mean_z = bucket_cache["blocks.1.attn.hook_z"][:, :, 2].mean(0)

    def mean_h(act):
        act[:, :, 2] = mean_z
        return act
    ref = batch.metric(_rerun(model, toks, "blocks.1.attn.hook_z", mean_h)) - m_clean
    np.testing.assert_allclose(got("mean", "a1.h2").to_numpy(), ref.numpy(), rtol=0, atol=1e-12)
    assert ref.abs().max() > 1e-3
    # resample ablation of MLP 0: prompts drawn (seeded) from the 2 held-out bucket prompts
    held_out = bucket_cache["blocks.0.hook_mlp_out"][4:]
    pick = torch.randint(0, 2, (4,), generator=torch.Generator().manual_seed(CFG["seed"]))

    def resample_m(act):
        return held_out[pick]
    ref = batch.metric(_rerun(model, toks, "blocks.0.hook_mlp_out", resample_m)) - m_clean
    np.testing.assert_allclose(got("resample", "m0").to_numpy(), ref.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(abl.filter(pl.col("component") == "m0").sort("method", "prompt")["clean_metric"]
                               .to_numpy()[:4], m_clean.numpy(), rtol=0, atol=1e-12)


def test_causal_tracing_restores_clean_exactly_and_matches_roles(run, model):
    ct = pl.read_parquet(run["dir"] / "causal_tracing.parquet")
    batch = _batch(4)
    with torch.no_grad():
        p_clean = answer_probability(batch.answer_ids)(model(batch.clean_tokens)).numpy()
    pp = ct.unique("prompt").sort("prompt")
    np.testing.assert_allclose(pp["m_clean"].to_numpy(), p_clean, rtol=0, atol=1e-14)
    np.testing.assert_allclose(pp["m_restore_all"].to_numpy(), p_clean, rtol=0, atol=1e-14)
    assert np.abs(pp["m_clean"] - pp["m_corrupted"]).max() > 1e-3  # the noise really corrupts
    # A one-token subject restored at layer 0 (residual) is the whole noised input: IE = clean - corrupted.
    for prompt in (0, 2):
        cell = ct.filter((pl.col("kind") == "resid") & (pl.col("layer") == 0) & (pl.col("position") == 2)
                         & (pl.col("prompt") == prompt)).row(0, named=True)
        assert cell["role"] == "last subject" and cell["is_subject"]
        assert abs(cell["score"] - (cell["m_clean"] - cell["m_corrupted"])) < 1e-14
    # Positions outside the subject restored at layer 0 change nothing (their input was never noised).
    outside = ct.filter((pl.col("kind") == "resid") & (pl.col("layer") == 0) & ~pl.col("is_subject"))
    assert outside["score"].abs().max() < 1e-14
    roles = ct.filter((pl.col("kind") == "resid") & (pl.col("layer") == 0) & (pl.col("prompt") == 1)).sort("position")
    assert roles["role"].to_list() == position_roles(POS, [2, 3]) == [
        "prefix", "prefix", "first subject", "last subject", "first subsequent", "further", "last token"]
    assert ct.filter(pl.col("kind") == "mlp")["window"].unique().to_list() == [2]


def test_subject_positions_come_from_the_clean_corrupted_difference(run):
    batch = _batch(6)
    assert subject_positions(batch) == SPANS
    same = make_batch([TaskItem(**{**_items(SPANS)[0].to_row(), "corrupted_ids": _items(SPANS)[0].clean_ids})],
                      "logit_diff")
    with pytest.raises(DataError, match="identical"):
        subject_positions(same)


def test_causal_trace_refuses_a_task_without_subjects(tmp_path, model):
    dataset = write_task(tmp_path / "dataset.jsonl", kind="ioi")
    with pytest.raises(ConfigError, match="no subject positions"):
        causal_trace(CT_CFG, model_cfg=MODEL_CFG, dataset=dataset, causal_tracing=tmp_path / "ct.parquet",
                     figure=tmp_path / "ct.png", loaded_model=model)


def test_neuron_contexts_from_harvest_equal_the_corpus_scan_and_brute_force(tmp_path, model):
    ctx = write_corpus(tmp_path / "tokens.parquet")
    harvest({"hooks": ["blocks.1.mlp.hook_post"], "batch_size": 4, "shard_rows": 30, "row_group_rows": 7,
             "progress": False}, model_cfg=MODEL_CFG, tokens=tmp_path / "tokens.parquet",
            index=tmp_path / "h" / "index.json", harvest_dir=tmp_path / "h" / "shards", loaded_model=model)
    wanted = {0: [3, 40], 1: [5, 17]}
    c = AnalysisConfig.from_dict({**CFG, "context_tokens": 10_000})
    from_harvest = neuron_contexts(model, wanted, c, tokens=tmp_path / "tokens.parquet",
                                   harvest_index=tmp_path / "h" / "index.json")
    from_corpus = neuron_contexts(model, wanted, c, tokens=tmp_path / "tokens.parquet", harvest_index=None)
    assert set(from_harvest.filter(pl.col("layer") == 1)["context_source"]) == {"harvest:blocks.1.mlp.hook_post"}
    # layer 0 not harvested
    assert set(from_harvest.filter(pl.col("layer") == 0)["context_source"]) == {"corpus:120 tokens"}
    a, b = from_harvest.sort("layer", "neuron", "rank"), from_corpus.sort("layer", "neuron", "rank")
    for col in ("layer", "neuron", "rank", "context_id", "position", "token_id", "context_token_ids"):
        assert a[col].to_list() == b[col].to_list(), col
    np.testing.assert_allclose(a["activation"].to_numpy(), b["activation"].to_numpy(), rtol=1e-6)
    with torch.no_grad():  # brute force over every corpus token
        _, cache = model.run_with_cache(torch.tensor(ctx))
    for layer, neurons in wanted.items():
        for n in neurons:
            vals, idx = cache[f"blocks.{layer}.mlp.hook_post"][:, :, n].flatten().topk(3)
            rows = b.filter((pl.col("layer") == layer) & (pl.col("neuron") == n))
            np.testing.assert_allclose(rows["activation"].to_numpy(), vals.float().numpy(), rtol=1e-6)
            assert [divmod(i, 10) for i in idx.tolist()] == list(zip(rows["context_id"], rows["position"]))
    # The token budget bounds the scan: 25 tokens -> the first 2 contexts of 10.
    small = corpus_top_contexts(model, ctx[:2], {1: [5]}, 3, 2)
    budget = neuron_contexts(model, {1: [5]}, AnalysisConfig.from_dict({**CFG, "context_tokens": 25}),
                             tokens=tmp_path / "tokens.parquet", harvest_index=None)
    assert budget["context_id"].to_list() == small["context_id"].to_list() and max(budget["context_id"]) <= 1


def test_top_neurons_are_ranked_by_their_scores(run):
    neur = pl.read_parquet(run["out"]["neurons"]).filter(pl.col("context_rank") == 0)
    for method, col in (("neuron_dla", "dla_score"), ("neuron_ap", "ap_score")):
        sub = neur.filter(pl.col("method") == method).sort("rank")
        assert sub["score"].to_list() == sub[col].to_list()
        assert sub["score"].abs().to_list() == sorted(sub["score"].abs().to_list(), reverse=True)
    assert set(neur["context_source"]) == {"corpus:60 tokens"}


@pytest.mark.parametrize(("model", "cfg", "match"), [
    ("analysis", {"bogus": 1}, r"^analysis\.bogus: unknown key"),
    ("analysis", {"ablations": ["zero", "knockout"]}, r"^analysis\.ablations"),
    ("analysis", {"ig_check": "warn"}, r"^analysis\.ig_check"),
    ("analysis", {"n_prompts": 1}, r"^analysis\.n_prompts"),
    ("analysis", {"ig_rtol": -0.1}, r"^analysis\.ig_rtol"),
    ("analysis", {"context_tokens": 0}, r"^analysis\.context_tokens"),
    ("analysis", {"causal_tracing": {}}, r"^analysis\.causal_tracing: unknown key"),  # its own group now
    ("causal_tracing", {"kinds": ["resid", "heads"]}, r"^causal_tracing\.kinds"),
    ("causal_tracing", {"noise": 3}, r"^causal_tracing\.noise: unknown key"),
    ("causal_tracing", {"metric": "kl"}, r"^causal_tracing\.metric"),
])
def test_bad_config_names_the_key(model, cfg, match):
    with pytest.raises(ConfigError, match=match):
        {"analysis": AnalysisConfig, "causal_tracing": CausalTracingConfig}[model].from_dict(cfg)


def test_bad_config_fails_the_stage_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="ig_baseline"):
        analyze({"ig_baseline": "noise"}, model_cfg=MODEL_CFG, dataset=tmp_path / "missing.jsonl",
                tokens=tmp_path / "t.parquet", loaded_model=object(), **outputs(tmp_path))
    with pytest.raises(ConfigError, match="window"):
        causal_trace({"window": 0}, model_cfg=MODEL_CFG, dataset=tmp_path / "missing.jsonl",
                     causal_tracing=tmp_path / "c.parquet", figure=tmp_path / "c.png", loaded_model=object())


def test_default_yaml_dataclass_and_schema_agree():
    """The three groups of the attribution stage: YAML = class defaults, schema keys = model fields."""
    for group_name, model in (("attribution", AttributionConfig), ("analysis", AnalysisConfig),
                              ("causal_tracing", CausalTracingConfig)):
        group = yaml.safe_load((REPO / "config" / group_name / "default.yaml").read_text())
        schema = json.loads((REPO / "workflow" / "schemas" / "config" / f"{group_name}.schema.json").read_text())
        jsonschema.validate(group, schema)
        assert model.from_dict(group) == model(), group_name
        assert set(schema["properties"]) == set(group) == set(model.__dataclass_fields__), group_name
    with pytest.raises(ConfigError, match="attribution.bogus"):
        AttributionConfig.from_dict({"bogus": 1})


def test_dry_run_plans_analyze_for_every_task_and_causal_trace_for_factual_recall(tmp_path):
    from mechflow.config import compose_runs
    from mechflow.workflow.inputs import analysis_outputs

    runs = compose_runs()
    (name, run_), = runs.items()
    targets = analysis_outputs(name, run_.cfg)
    assert len([t for t in targets if t.endswith(ANALYZE_OUTPUTS[-1])]) == len(run_.cfg["task"]) == 3
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                             str(tmp_path), "-n", "--cores", "2", *targets], check=False, capture_output=True,
                            text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = {}
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["job", "count"])
    for line in lines[start + 2:]:
        parts = line.split()
        if parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    assert counts["analyze"] == 3 and counts["causal_trace"] == 1, counts
    assert f"results/{name}/attribution/factual_recall/causal_tracing.parquet" in result.stdout
    assert "attribution/ioi/causal_tracing" not in result.stdout
    assert "harvest/index.json" not in result.stdout  # the default harvest has no mlp.hook_post: corpus scan
