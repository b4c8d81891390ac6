"""Every stage function a rule runs receives its config group typed (`run_rule` -> `typed_config`)."""

from __future__ import annotations

import typing

import pytest

from mechflow.attribution.analysis import run_analysis, run_causal_tracing
from mechflow.attribution.stage import run_attribution
from mechflow.circuits.stage import run_circuit
from mechflow.config import compose_config
from mechflow.dictionaries.sae import train_sae
from mechflow.dictionaries.transcoder import train_transcoder
from mechflow.harvest.core import harvest
from mechflow.reference.edges import run_edge_reference
from mechflow.reference.stage import run_reference
from mechflow.stats.feature_stage import run_feature_matching
from mechflow.stats.stage import run_cross_model, run_statistics
from mechflow.summary.core import summarize
from mechflow.tasks.core import evaluate_task, prepare_task
from mechflow.workflow.adapter import typed_config

# stage function -> how its rule's `cfg` param is taken from the composed config. Not typed on purpose:
# prepare_corpus (corpus.json's config_hash hashes the group as composed), feature_analysis (reads the
# `sae.features` block), evaluate_* (take either an `eval` block or a whole group), benchmark (splits
# `benchmark.compare` off first).
STAGES = {
    prepare_task: lambda c: c["task"]["ioi"], evaluate_task: lambda c: c["task"]["ioi"],
    harvest: lambda c: c["harvest"], train_sae: lambda c: c["sae"],
    train_transcoder: lambda c: c["transcoder"], run_attribution: lambda c: c["attribution"],
    run_analysis: lambda c: c["analysis"], run_causal_tracing: lambda c: c["causal_tracing"],
    run_circuit: lambda c: c["circuits"], run_edge_reference: lambda c: c["reference"],
    run_reference: lambda c: c["reference"], run_statistics: lambda c: c["stats"],
    run_cross_model: lambda c: c["stats"], run_feature_matching: lambda c: c["stats"],
    summarize: lambda c: c["summary"],
}


@pytest.fixture(scope="module")
def composed():
    return compose_config([])


@pytest.mark.parametrize("stage", list(STAGES), ids=lambda f: f.__name__)
def test_the_rule_config_arrives_typed(stage, composed):
    typed = typed_config(STAGES[stage](composed), typing.get_type_hints(stage)["cfg"])
    assert not isinstance(typed, dict) and callable(getattr(typed, "to_dict", None) or getattr(typed, "model_dump"))
