"""Benchmark files: ``acdc.json`` (ACDC tau sweep) and ``timings.json`` (the method comparison).

The step table ``acdc_steps.parquet`` is `mechflow.contracts.parquet.ACDC_STEPS_SCHEMA`. Edge
names are MIB names (`mechflow.contracts.names`).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from mechflow.contracts.documents import Document, VersionedDocument

# ----------------------------------------------------------------------------- acdc.json


class AcdcTaskMetric(Document):
    kind: str = Field(description="the task metric: logit_diff | prob_diff")
    m_full: float
    m_empty: float


class AcdcRunDocument(Document):
    """One tau of the sweep."""

    threshold: float = Field(description="tau")
    n_kept: int
    metric: float = Field(description="ACDC's own metric of the final circuit")
    n_forward: int
    n_evaluations: int
    n_wasted: int = Field(description="speculative evaluations thrown away")
    n_decided_by_evaluation: int
    seconds: float
    edges: list[str] = Field(description="the kept edges")
    task_metric: float
    faithfulness: float | None = Field(description="MIB normalised faithfulness (null: m(N) = m(empty))")


class AcdcDocument(VersionedDocument):
    """``acdc.json`` of the ``acdc`` rule (written after ``acdc_steps.parquet``: marks completion)."""

    model: dict[str, Any] = Field(description="the model config group")
    task: str
    config: dict[str, Any]
    config_hash: str
    dataset_sha256: str
    prompt_ids: list[int | str]
    n_prompts: int
    n_pos: int
    n_edges_total: int
    n_edges_restricted: int
    metric: str = Field(description="ACDC's metric (benchmark.acdc.metric)")
    task_metric: AcdcTaskMetric
    runs: list[AcdcRunDocument]


# ----------------------------------------------------------------------------- timings.json


class CurvePointDocument(Document):
    percent: float
    n_edges: int
    metric: float
    faithfulness: float


class BenchmarkAcdcRun(Document):
    threshold: float
    seconds: float
    n_forward: int
    n_evaluations: int
    n_wasted: int
    n_kept: int
    acdc_metric: float
    faithfulness: float
    tpr: float
    fpr: float


class BenchmarkAcdc(Document):
    setup_seconds: float
    matched_index: int = Field(description="index in runs of the tau compared with ours")
    runs: list[BenchmarkAcdcRun]


class Normalisation(Document):
    m_full: float
    m_restricted_empty: float
    definition: str


class Headline(Document):
    acdc_tau: float
    acdc_match: str
    acdc_seconds: float
    acdc_setup_seconds: float
    acdc_run_seconds: float
    ours_seconds: float
    eap_ig_seconds: float
    search_seconds: float
    ratio: float = Field(description="acdc_seconds / ours_seconds")
    arithmetic: str
    acdc_sweep_ratio: float
    acdc_faithfulness: float
    ours_faithfulness: float
    acdc_cpr: float
    ours_cpr: float


class FullGraphRow(Document):
    method: str
    seconds: float
    measured: bool
    ratio_to_ours: float
    arithmetic: str


class MethodRow(Document):
    """A row of ``table.csv`` (same columns)."""

    method: str
    seconds: float
    n_forward: int
    n_backward: int
    n_edges_in_circuit: int
    faithfulness: float
    cpr: float
    cmd: float
    roc_auc: float | None


class TimingsDocument(VersionedDocument):
    """``timings.json`` of the ``benchmark`` rule: every number of the comparison."""

    model: dict[str, Any] | None = Field(None, description="the model config group")
    task: str | None = None
    prompt_ids: list[int | str] | None = None
    config: dict[str, dict[str, Any]] = Field(description="benchmark and compare settings")
    config_hash: str
    n_prompts: int
    n_pos: int
    restriction: dict[str, Any]
    n_edges_restricted: int
    n_edges_full: int
    normalisation: Normalisation
    machine: dict[str, Any]
    acdc: BenchmarkAcdc
    eap: dict[str, Any]
    eap_ig: dict[str, Any]
    ours: dict[str, Any]
    exhaustive: dict[str, Any]
    curves: dict[str, list[CurvePointDocument]] = Field(description="method -> faithfulness at each MIB budget")
    areas: dict[str, dict[str, float]] = Field(description="method -> cpr, cmd")
    roc_auc: dict[str, float | None]
    headline: Headline
    full_graph_extrapolation: dict[str, Any]
    full_graph: list[FullGraphRow]
    table: list[MethodRow]
