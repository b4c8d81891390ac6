"""JSON documents: the version policy, the write/read helpers, and real writers' output against their models."""

from __future__ import annotations

import json
import typing
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel, ValidationError

from mechflow.contracts import catalog
from mechflow.contracts.attribution import Agreement
from mechflow.contracts.benchmark import AcdcDocument
from mechflow.contracts.dictionaries import DictionaryTraining, TranscoderMetrics
from mechflow.contracts.documents import (
    VersionedDocument,
    check_document,
    load_document,
    read_document,
    union_members,
    write_document,
)
from mechflow.contracts.features import FeatureSummary
from mechflow.contracts.parquet import ACDC_STEPS_SCHEMA, schema_mismatches
from mechflow.contracts.stats import CkaDocument
from mechflow.contracts.tasks import TaskBaseline, TaskDatasetMeta, TaskDatasetRow
from mechflow.contracts.versions import SCHEMA_VERSION
from mechflow.errors import DataError
from mechflow.io import atomic_write_json


def test_catalog_names_are_unique_and_every_versioned_document_starts_with_the_version():
    for names in ([d.name for d in catalog.DOCUMENTS], [t.name for t in catalog.TABLES]):
        assert len(names) == len(set(names))
    for doc in catalog.DOCUMENTS:
        for model in union_members(doc.model):
            fields = list(model.model_fields)
            if "schema_version" in fields:
                assert issubclass(model, VersionedDocument) and fields[0] == "schema_version", model
                assert model.model_fields["schema_version"].default == SCHEMA_VERSION
                assert typing.get_args(model.model_fields["schema_version"].annotation) == (SCHEMA_VERSION,)


def test_every_document_forbids_unknown_keys_except_the_per_task_metrics():
    def walk(model: type[BaseModel], seen: set):
        if model in seen:
            return
        seen.add(model)
        extra = model.model_config.get("extra")
        assert extra == ("allow" if model is FeatureSummary else "forbid"), model
        for f in model.model_fields.values():
            for arg in _leaves(f.annotation):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    walk(arg, seen)

    seen: set = set()
    for doc in catalog.DOCUMENTS:
        for model in union_members(doc.model):
            walk(model, seen)
    with pytest.raises(ValidationError):  # FeatureSummary's extra keys are numbers
        FeatureSummary.model_validate({**FEATURE_SUMMARY, "ioi_pearson": "high"})


def _leaves(annotation):
    args = typing.get_args(annotation)
    return [annotation] if not args else [leaf for a in args for leaf in _leaves(a)]


BASELINE = {"schema_version": "1", "task": "ioi", "kind": "ioi", "metric": "logit_diff", "model": "m",
            "config_hash": "h", "dataset_sha256": "d", "meta_sha256": "e", "n_prompts": 2,
            "clean_metric_mean": 1, "corrupted_metric_mean": -0.5, "clean_metric_std": 0.1, "accuracy": 1.0,
            "chance_accuracy": 0.5, "chance_metric_mean": 0.0, "corrupted_accuracy": 0.0,
            "clean_beats_corrupted": 1.0, "p_value_accuracy": 0.25, "p_value_clean_vs_corrupted": 0.25,
            "verdict": "PASSES", "per_prompt": [{"id": 0, "clean": 1.0, "corrupted": -1}, {"id": "b", "clean": 1.0,
                                                                                           "corrupted": 0.0}]}


def test_write_document_writes_the_dict_exactly_as_given(tmp_path):
    # ints in float fields stay ints, key order is the writer's, absent optional keys stay absent
    doc = {**BASELINE}
    doc.pop("clean_metric_std")
    doc = {"verdict": doc.pop("verdict"), **doc}
    write_document(tmp_path / "a.json", TaskBaseline, doc)
    atomic_write_json(tmp_path / "b.json", doc)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    with pytest.raises(ValidationError):
        write_document(tmp_path / "c.json", TaskBaseline, {**doc, "extra": 1})
    with pytest.raises(ValidationError):
        write_document(tmp_path / "c.json", TaskBaseline, {**doc, "schema_version": "2"})
    assert not (tmp_path / "c.json").exists()


def test_not_posable_baseline_is_valid():
    doc = {**BASELINE, "n_prompts": 0, "per_prompt": [], "verdict": "FAILS: cannot be posed"}
    for key in ("clean_metric_mean", "corrupted_metric_mean", "accuracy", "chance_accuracy", "chance_metric_mean",
                "p_value_accuracy", "p_value_clean_vs_corrupted"):
        doc[key] = None
    for key in ("clean_metric_std", "corrupted_accuracy", "clean_beats_corrupted"):
        doc.pop(key)
    check_document(TaskBaseline, doc)


def test_readers_name_the_file_and_the_fix(tmp_path):
    fix = "re-run the evaluate_task stage"
    with pytest.raises(DataError, match=f"does not exist; {fix}"):
        read_document(tmp_path / "none.json", TaskBaseline, fix=fix)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_document(tmp_path / "bad.json", TaskBaseline, fix=fix)
    (tmp_path / "wrong.json").write_text(json.dumps({**BASELINE, "n_prompts": "many"}))
    with pytest.raises(DataError, match=r"(?s)wrong.json: not a valid TaskBaseline .*n_prompts.*re-run the evaluate"):
        read_document(tmp_path / "wrong.json", TaskBaseline, fix=fix)
    (tmp_path / "ok.json").write_text(json.dumps(BASELINE))
    assert read_document(tmp_path / "ok.json", TaskBaseline, fix=fix).per_prompt[1].id == "b"
    assert load_document(tmp_path / "ok.json", TaskBaseline, fix=fix) == BASELINE


def test_partial_reads_check_only_the_keys_present_against_any_union_member(tmp_path):
    path = tmp_path / "training.json"
    path.write_text(json.dumps({"holdout_shards": ["part-00001.parquet"], "exclude_bos": True, "model": "m"}))
    assert load_document(path, DictionaryTraining, fix="x", partial=True)["model"] == "m"
    path.write_text(json.dumps({"in_scale": [1.0], "layers": [0, 1]}))  # transcoder-only keys
    load_document(path, DictionaryTraining, fix="x", partial=True)
    path.write_text(json.dumps({"holdout_shard": []}))
    with pytest.raises(DataError, match="unknown key"):
        load_document(path, DictionaryTraining, fix="x", partial=True)
    path.write_text(json.dumps({"exclude_bos": "sometimes"}))
    with pytest.raises(DataError, match="re-run it"):
        load_document(path, DictionaryTraining, fix="re-run it", partial=True)
    path.write_text(json.dumps({"exclude_bos": True}))
    with pytest.raises(DataError, match="not a valid SaeTraining"):  # the full check needs every required key
        load_document(path, DictionaryTraining, fix="x")


def test_task_dataset_files_follow_their_contracts(tmp_path):
    from mechflow.tasks.dataset import TaskDataset, meta_path_of
    from mechflow.testing import write_tiny_task_dataset

    path = write_tiny_task_dataset(tmp_path / "dataset.jsonl", "tiny")
    meta = json.loads(meta_path_of(path).read_text())
    check_document(TaskDatasetMeta, meta)
    assert list(meta)[0] == "schema_version" and meta["tokenizer"] == {"model": "tiny"}
    for line in path.read_text().splitlines():
        check_document(TaskDatasetRow, json.loads(line))
    assert len(TaskDataset.load(path).examples) == 5
    meta["posable"] = "maybe"
    meta_path_of(path).write_text(json.dumps(meta))
    with pytest.raises(DataError, match="(?s)dataset.meta.json.*posable.*prepare_task"):
        TaskDataset.load(path)


def test_acdc_outputs_follow_their_contracts(tiny_llama, tmp_path):
    from mechflow.benchmark.core import ACDC_JSON, ACDC_STEPS, acdc_outputs, run_acdc
    from mechflow.testing import write_tiny_task_dataset

    data = write_tiny_task_dataset(tmp_path / "dataset.jsonl", "tiny")
    loaded = SimpleNamespace(model=tiny_llama, card=SimpleNamespace(name="tiny"))
    cfg = {"n_prompts": 4, "restriction": {"last_layers": 1}, "acdc": {"thresholds": [0.01, 0.3]}}
    doc = run_acdc(cfg, model_cfg={"name": "tiny"}, dataset=data, **acdc_outputs(tmp_path / "out"),
                   model=loaded)
    written = json.loads((tmp_path / "out" / ACDC_JSON).read_text())
    assert written == json.loads(json.dumps(doc))
    AcdcDocument.model_validate(written)
    assert schema_mismatches(pq.read_schema(tmp_path / "out" / ACDC_STEPS), ACDC_STEPS_SCHEMA) == []


def test_cka_document_from_the_report_is_valid():
    from mechflow.stats.alignment import CKAPrompts
    from mechflow.stats.cka import cka_by_depth
    from mechflow.stats.report import cka_headline

    rng = np.random.default_rng(0)
    acts_a = {layer: rng.normal(size=(10, 6)) for layer in range(2)}
    acts_b = {layer: rng.normal(size=(10, 5)) for layer in range(3)}
    for shuffles in (0, 3):
        res = cka_by_depth(acts_a, acts_b, n_layers_a=2, n_layers_b=3, n_shuffles=shuffles)
        doc = cka_headline(res, CKAPrompts(["t"] * 10, 10, 9, 9), "a", "b")
        CkaDocument.model_validate(json.loads(json.dumps(doc)))


AGREEMENT = {"ap": {"pearson_vs_exact": 0.9, "spearman_vs_exact": 0.8, "max_abs_error": 0.1},
             "ig": {"pearson_vs_exact": 0.99, "spearman_vs_exact": 0.95, "max_abs_error": 0.01},
             "n_prompts": 4, "ig_steps": 3, "direction": "noising", "m_clean_mean": 2.0, "m_corrupted_mean": -1.0,
             "dla_sum_minus_logit_diff_max": 1e-6}
FEATURE_SUMMARY = {"stage": "features", "hook": "blocks.1.hook_resid_post", "layer": 1, "model": "m",
                   "architecture": "topk", "dictionary": "d", "d_in": 32, "d_sae": 64, "config": {},
                   "exclude_bos": True, "n_tokens": 100, "n_live": 60, "n_dead": 4, "dead_fraction": 0.0625,
                   "n_records": 10, "logit_effects": True, "hist_log10_range": [-6, 1], "hist_bins_per_decade": 10,
                   "tasks": [], "ioi_pearson": 0.3, "ioi_sign_agreement": 0.7}


def test_representative_documents_of_writers_outside_these_packages():
    Agreement.model_validate(AGREEMENT)
    Agreement.model_validate({k: v for k, v in AGREEMENT.items() if k != "ig"})  # methods: [exact, ap]
    FeatureSummary.model_validate(FEATURE_SUMMARY)


def test_transcoder_metrics_are_either_layout_by_stage():
    base = {"dictionary": "d", "holdout_shards": ["p"], "exclude_bos": True, "n_tokens": 10, "dead_fraction": 0.0,
            "dead_window_tokens": 10, "dead_window_sufficient": False, "explained_variance": 0.9, "fvu": 0.1}
    stack = {**base, "stage": "evaluate_transcoder", "kind": "clt", "layers": [0, 1], "in_hooks": ["a", "b"],
             "out_hooks": ["c", "d"], "fvu_per_layer": [0.1, 0.2], "l0_per_layer": [3.0, 4.0], "l0": 7.0,
             "l0_definition": "sum"}
    check_document(TranscoderMetrics, stack)
    with pytest.raises(ValidationError):
        check_document(TranscoderMetrics, {**stack, "stage": "evaluate_dictionary"})


def test_catalog_writers_and_readers_name_existing_code():
    import importlib

    refs = [r for entry in (*catalog.DOCUMENTS, *catalog.TABLES) for r in (entry.writer, *entry.readers)]
    for ref in refs:
        if ref == "(user)":
            continue
        module, _, attr = ref.partition(":")
        obj = importlib.import_module(module)
        for part in filter(None, attr.split(".")):
            obj = getattr(obj, part)
