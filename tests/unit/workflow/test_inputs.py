"""Input / params functions of `mechflow.workflow.inputs` follow the run config (no Snakemake needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mechflow.config import Run, compose_runs
from mechflow.errors import ConfigError
from mechflow.workflow import inputs, runs


@pytest.fixture()
def default_run(monkeypatch):
    (name, run_), = compose_runs().items()
    monkeypatch.setitem(runs.RUNS, name, run_)
    return name, run_


def test_analysis_inputs_follow_the_run_config(monkeypatch, default_run):
    name, run_ = default_run
    wc = SimpleNamespace(run=name, task="factual_recall")
    assert inputs.analysis_outputs_of(wc) == inputs.analysis_outputs(name, run_.cfg)
    assert inputs.causal_tracing_of(wc) == [f"results/{name}/attribution/factual_recall/causal_tracing.parquet"]
    assert inputs.causal_tracing_of(SimpleNamespace(run=name, task="ioi")) == []
    assert inputs.neuron_harvest_of(wc) == []  # the default harvest has no mlp.hook_post
    cfg = {**run_.cfg, "harvest": {**run_.cfg["harvest"], "hooks": ["blocks.3.mlp.hook_post"]}}
    monkeypatch.setitem(runs.RUNS, name, Run(name, run_.overrides, cfg))
    assert inputs.neuron_harvest_of(wc) == [f"results/{name}/harvest/index.json"]


def test_stage_cfg_drops_the_keys_a_rule_does_not_read(default_run):
    name, run_ = default_run
    wc = SimpleNamespace(run=name)
    assert inputs.stage_cfg("attribution")(wc) == run_.cfg["attribution"]
    assert inputs.stage_cfg("causal_tracing")(wc) == run_.cfg["causal_tracing"]
    assert "enabled" not in inputs.stage_cfg("benchmark")(wc)


def test_feature_and_reference_inputs_name_every_output(default_run):
    name, run_ = default_run
    wc = SimpleNamespace(run=name, task="ioi")
    assert inputs.feature_outputs_of(wc)[0] == f"results/{name}/features/features.jsonl"
    assert inputs.feature_datasets_of(wc) == [f"results/{name}/tasks/ioi/dataset.jsonl"]  # features.tasks
    assert len(inputs.reference_outputs_of(wc)) == 4 * len(run_.cfg["task"])
    assert inputs.circuit_scores_of(wc) == {"circuit": f"results/{name}/circuits/ioi/circuit.json",
                                            "edge_scores": f"results/{name}/circuits/ioi/edge_scores.parquet"}


def test_a_stage_setting_naming_an_unselected_task_fails_with_the_key(monkeypatch, default_run):
    name, run_ = default_run
    cfg = {**run_.cfg, "reference": {**run_.cfg["reference"], "tasks": ["ioi", "nope"]}}
    monkeypatch.setitem(runs.RUNS, name, Run(name, run_.overrides, cfg))
    with pytest.raises(ConfigError, match=r"reference.tasks: \['nope'\] are not selected"):
        inputs.reference_outputs_of(SimpleNamespace(run=name))
