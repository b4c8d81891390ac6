"""`mechflow plan` and the per-rule resources: the shape arithmetic against exact references (torch's
FLOP counter on a real forward, the parameter count of a model), the estimates against the measured
points they were not fitted to, the command and the resources the workflow derives from a config."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mechflow.cli import main
from mechflow.config import Run, compose_runs
from mechflow.plan import load_costs, preset, shape_of_model
from mechflow.plan.estimate import harvest_estimate, training_estimate
from mechflow.plan.run import run_estimates
from mechflow.plan.shapes import PRESETS, ModelShape, shape_for_model_cfg, shape_from_hf_config
from mechflow.workflow import resources, runs


@pytest.fixture(scope="module")
def tiny():
    """A tiny gated, grouped-query TransformerLens model (the SmolLM2 / Llama layout)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=3, d_model=48, d_head=8, n_heads=6, n_key_value_heads=2, d_mlp=96,
                                  d_vocab=101, n_ctx=32, act_fn="silu", normalization_type="RMS", gated_mlp=True,
                                  positional_embedding_type="rotary", rotary_dim=8, seed=0)
    return HookedTransformer(cfg)


def test_parameter_count_of_the_shape_is_the_models(tiny):
    shape = shape_of_model(tiny)
    weights = sum(p.numel() for n, p in tiny.named_parameters() if n.rsplit(".", 1)[-1].lstrip("_").startswith("W_")
                  or n.endswith(".w"))
    # TL keeps K/V per KV group (_W_K), W_E and W_U untied, one norm weight per ln1/ln2/ln_final
    assert weights == shape.params


@pytest.mark.parametrize("layers", [1, 3, None])
def test_forward_flops_equal_torch_flop_counter(tiny, layers):
    from torch.utils.flop_counter import FlopCounterMode

    shape, ctx = shape_of_model(tiny), 16
    tokens = torch.randint(0, 101, (2, ctx))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tiny(tokens, stop_at_layer=layers)
    counted = counter.get_total_flops() / tokens.numel()
    # the counter counts the whole ctx x ctx score matrix; mechflow's estimate counts the causal half
    full_square = shape.n_heads * shape.d_head * ctx * 2 * (layers or shape.n_layers)
    assert counted == pytest.approx(shape.forward_flops(ctx, layers, unembed=layers is None) + full_square, rel=1e-9)


def test_presets_match_their_published_sizes():
    published = {"SmolLM2-135M": 134.5e6, "Llama-3.2-1B": 1.24e9, "Gemma-2-2B": 2.61e9, "Llama-3.1-8B": 8.03e9,
                 "Gemma-2-9B": 9.24e9, "Gemma-2-27B": 27.2e9, "Llama-3.1-70B": 70.6e9, "Gemma-3-270M": 268e6}
    for name, n in published.items():
        assert PRESETS[name].params == pytest.approx(n, rel=0.01), name


def test_shape_from_a_config_json(tmp_path):
    import json

    cfg = {"model_type": "starcoder2", "num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 256,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = shape_for_model_cfg({"name": str(tmp_path)})
    assert shape == ModelShape(tmp_path.name, 4, 64, 256, 4, 2, 16, 1000, gated_mlp=False, tied_embeddings=False)
    assert shape_for_model_cfg({"name": "meta-llama/Llama-3.1-8B"}) is PRESETS["Llama-3.1-8B"]
    assert shape_for_model_cfg({"name": "some/unknown-model"}) is None
    with pytest.raises(Exception, match="hidden_size"):
        shape_from_hf_config({"num_hidden_layers": 2})


def test_estimates_reproduce_the_measured_points():
    """Each harvest / training point of the shipped measurement against its estimate. The time rates are
    least-squares fits over the points, so this checks that time is linear in tokens, FLOPs and stored
    values as modelled; harvest memory was fitted on the first point only and predicts the others (other
    depth, 6x to 60x the tokens); disk is one bytes-per-value ratio."""
    costs, shape = load_costs(), preset("smollm2_135m")
    assert len(costs.harvest) >= 4 and len(costs.training) >= 5
    for p in costs.harvest:
        est = harvest_estimate(shape, costs, tokens=p.tokens, hooks=p.hooks, ctx=costs.context_size, batch_size=8,
                               shard_rows=p.shard_rows)
        assert est.seconds == pytest.approx(p.seconds, rel=0.15), p
        assert est.peak_mb == pytest.approx(p.peak_rss_mb, rel=0.05), p
        assert est.disk_bytes == pytest.approx(p.disk_bytes, rel=0.02), p
    for p in costs.training:
        est = training_estimate(costs, stage="train_sae", tokens=p.tokens, d_in=p.d_in, d_sae=p.d_sae,
                                buffer_rows=65536, batch_size=2048)
        assert est.seconds == pytest.approx(p.seconds, rel=0.1), p
        assert est.peak_mb == pytest.approx(p.peak_rss_mb, rel=0.15), p


def test_peak_memory_stays_flat_as_tokens_grow():
    """Issue 20: harvest and training at 1x, 4x, 10x the default token count keep peak RSS flat."""
    costs = load_costs()
    series = [p for p in costs.harvest if p.stop_layer == 2]
    train = [p for p in costs.training if p.tokens == p.corpus_tokens]
    for points in (series, train):
        assert len(points) >= 3 and max(p.tokens for p in points) >= 10 * min(p.tokens for p in points)
        peaks = [p.peak_rss_mb for p in points]
        assert max(peaks) <= 1.1 * min(peaks), peaks


def test_plan_command(capsys):
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "SmolLM2-135M" in out and "harvest" in out and "train_sae" in out
    assert main(["plan", "--model", "Llama-3.1-8B", "--tokens", "1000000"]) == 0
    assert "Llama-3.1-8B" in capsys.readouterr().out
    assert main(["plan", "--table"]) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in PRESETS)
    assert main(["plan", "--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nope'" in err and "\n" not in err.strip()


def test_estimates_grow_with_the_model_and_the_tokens():
    (_, run_), = compose_runs().items()
    costs = load_costs()
    small = {r.stage: r for r in run_estimates(run_.cfg, preset("smollm2_135m"), costs)}
    big = {r.stage: r for r in run_estimates(run_.cfg, preset("Llama-3.1-70B"), costs)}
    assert big["harvest"].seconds > 100 * small["harvest"].seconds
    assert big["harvest"].peak_mb > 200_000  # 70B float32 weights alone are 282 GB
    more = {**run_.cfg, "corpus": {**run_.cfg["corpus"], "max_tokens": 10 * run_.cfg["corpus"]["max_tokens"]}}
    ten = {r.stage: r for r in run_estimates(more, preset("smollm2_135m"), costs)}
    startup = costs.harvest_startup_s
    assert ten["harvest"].seconds - startup == pytest.approx(10 * (small["harvest"].seconds - startup), rel=1e-9)
    assert ten["harvest"].peak_mb == small["harvest"].peak_mb  # one shard per hook in memory


@pytest.fixture()
def run_of(monkeypatch):
    def make(overrides=None):
        (name, run_), = compose_runs(overrides).items()
        monkeypatch.setitem(runs.RUNS, name, run_)
        return name, run_
    return make


def test_rule_resources_follow_the_config(run_of, monkeypatch):
    name, run_ = run_of()
    wc = SimpleNamespace(run=name, task="ioi")
    harvest_mb = resources.mem_mb_of("harvest")(wc)
    assert 1000 < harvest_mb < 16000 and resources.runtime_of("harvest")(wc) >= 10
    assert resources.mem_mb_of("harvest")(wc, attempt=2) == 2 * harvest_mb  # a retry asks for twice
    assert resources.mem_mb_of("attribute", 8000)(wc) == pytest.approx(8000, rel=0.01)  # stated for SmolLM2
    assert resources.gpu_of("sae")(wc) == 0
    # a bigger model: every request grows
    cfg = {**run_.cfg, "model": {**run_.cfg["model"], "name": "meta-llama/Llama-3.1-8B"}}
    monkeypatch.setitem(runs.RUNS, name, Run(name, run_.overrides, cfg))
    assert resources.mem_mb_of("harvest")(wc) > 4 * harvest_mb
    assert resources.mem_mb_of("attribute", 8000)(wc) > 60_000
    assert resources.runtime_of("attribute", 60)(wc) > 60 * 20
    # more prompts: per-task rules get more time; a CUDA device asks for a GPU
    cfg = {**run_.cfg, "task": {**run_.cfg["task"], "ioi": {**run_.cfg["task"]["ioi"], "n_prompts": 640}},
           "sae": {**run_.cfg["sae"], "device": "cuda"}}
    monkeypatch.setitem(runs.RUNS, name, Run(name, run_.overrides, cfg))
    assert resources.runtime_of("attribute", 60)(wc) == pytest.approx(600, rel=0.02)
    assert resources.gpu_of("sae")(wc) == 1
    # a model mechflow cannot size keeps the stated values
    cfg = {**run_.cfg, "model": {**run_.cfg["model"], "name": "someone/unknown"}}
    monkeypatch.setitem(runs.RUNS, name, Run(name, run_.overrides, cfg))
    assert resources.mem_mb_of("attribute", 8000)(wc) == 8000
