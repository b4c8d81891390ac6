"""Every stage function a rule runs receives its config group typed (`run_rule` -> `typed_config`)."""

from __future__ import annotations

import typing

import pytest

from mechflow.attribution.analyze import analyze
from mechflow.attribution.causal_trace import causal_trace
from mechflow.attribution.stage import attribute
from mechflow.benchmark.stage import benchmark
from mechflow.circuits.stage import circuits
from mechflow.config import compose_config
from mechflow.corpus.core import prepare_corpus
from mechflow.dictionaries.evaluate import evaluate_sae, evaluate_transcoder
from mechflow.dictionaries.sae import train_sae
from mechflow.dictionaries.transcoder import train_transcoder
from mechflow.features import feature_matching, features
from mechflow.harvest.core import harvest
from mechflow.reference.edges import edge_reference
from mechflow.reference.stage import reference
from mechflow.stats.stage import cross_model, stats
from mechflow.summary.core import summarize
from mechflow.tasks.core import evaluate_task, prepare_task
from mechflow.workflow.adapter import typed_config

# stage function -> how its rule's `cfg` param is taken from the composed config.
STAGES = {
    prepare_corpus: lambda c: c["corpus"],
    prepare_task: lambda c: c["task"]["ioi"], evaluate_task: lambda c: c["task"]["ioi"],
    harvest: lambda c: c["harvest"], train_sae: lambda c: c["sae"], evaluate_sae: lambda c: c["sae"],
    train_transcoder: lambda c: c["transcoder"], evaluate_transcoder: lambda c: c["transcoder"],
    attribute: lambda c: c["attribution"],
    analyze: lambda c: c["analysis"], causal_trace: lambda c: c["causal_tracing"],
    circuits: lambda c: c["circuits"], edge_reference: lambda c: c["reference"],
    reference: lambda c: c["reference"], stats: lambda c: c["stats"],
    cross_model: lambda c: c["stats"], features: lambda c: c["features"],
    feature_matching: lambda c: c["feature_matching"],
    summarize: lambda c: c["summary"], benchmark: lambda c: c["benchmark"],
}


@pytest.fixture(scope="module")
def composed():
    return compose_config([])


@pytest.mark.parametrize("stage", list(STAGES), ids=lambda f: f.__name__)
def test_the_rule_config_arrives_typed(stage, composed):
    typed = typed_config(STAGES[stage](composed), typing.get_type_hints(stage)["cfg"])
    assert not isinstance(typed, dict) and callable(getattr(typed, "to_dict", None) or getattr(typed, "model_dump"))
