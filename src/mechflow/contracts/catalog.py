"""Every file layout of the pipeline, by name: its contract, its writer and its readers.

`python -m mechflow.contracts.export` renders each entry to ``workflow/schemas/contracts/``
(``<name>.schema.json`` for a JSON document, ``parquet/<name>.json`` for a table); the outputs
documentation is generated from the same entries. Writers and readers name the code that goes
through the contract (``module:function``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from mechflow.contracts import (
    attribution,
    audit,
    benchmark,
    circuits,
    corpus,
    dictionaries,
    features,
    graphs,
    harvest,
    models,
    plan,
    reference,
    report,
    stats,
    steer,
    tasks,
)
from mechflow.contracts import parquet as pq_contracts


@dataclass(frozen=True)
class DocumentContract:
    """A JSON document: ``model`` is a `Document` subclass or a union of them."""

    name: str
    model: Any
    file: str
    writer: str
    readers: tuple[str, ...] = ()


@dataclass(frozen=True)
class TableContract:
    """A Parquet table."""

    name: str
    schema: pa.Schema
    file: str
    writer: str
    readers: tuple[str, ...] = ()
    description: str = ""
    column_types: dict[str, str] | None = None  # rendered instead of the schema's type (parametrised columns)


D = DocumentContract
DOCUMENTS: tuple[DocumentContract, ...] = (
    D("task_example", tasks.TaskExample, "user tasks: <path>.jsonl (one per line)", "(user)",
      ("mechflow.tasks.jsonl:build_jsonl",)),
    D("task_dataset_row", tasks.TaskDatasetRow, "tasks/{task}/dataset.jsonl (one per line)",
      "mechflow.tasks.dataset:write_dataset", ("mechflow.tasks.dataset:TaskDataset.load",)),
    D("task_dataset_meta", tasks.TaskDatasetMeta, "tasks/{task}/dataset.meta.json",
      "mechflow.tasks.dataset:write_dataset", ("mechflow.tasks.dataset:TaskDataset.load",)),
    D("task_baseline", tasks.TaskBaseline, "tasks/{task}/baseline.json", "mechflow.tasks.core:evaluate_task",
      ("mechflow.summary.core:summarize",)),
    D("model_card", models.ModelCard, "model_card.json", "mechflow.workflow.provenance:write_model_card",
      ("mechflow.stats.readers:read_model_card", "mechflow.summary.core:summarize")),
    D("run_manifest", models.RunManifest, "run_manifest.json", "mechflow.workflow.provenance:write_run_manifest"),
    D("corpus_manifest", corpus.CorpusManifest, "corpus/corpus.json", "mechflow.corpus.core:prepare_corpus"),
    D("harvest_index", harvest.HarvestIndex, "harvest/index.json", "mechflow.harvest.core:harvest",
      ("mechflow.harvest.shards:resolve_manifest", "mechflow.summary.core:summarize",
       "mechflow.attribution.neuron_contexts:_harvest_hooks", "mechflow.workflow.provenance:close_run")),
    D("harvest_manifest", harvest.HarvestManifest, "harvest/{hook}/_manifest.json", "mechflow.harvest.core:harvest",
      ("mechflow.harvest.shards:load_manifest", "mechflow.dictionaries.data", "mechflow.summary.core:summarize")),
    D("harvest_shard_sidecar", harvest.ShardSidecar, "harvest/{hook}/_part-NNNNN.json (resume state)",
      "mechflow.harvest.shards:write_shard", ("mechflow.harvest.shards:completed_shard",)),
    D("sae_training", dictionaries.SaeTraining, "dictionaries/sae/training.json", "mechflow.dictionaries.sae:train_sae",
      ("mechflow.dictionaries.evaluate:evaluate_dictionary", "mechflow.features.stage:harvest_source",
       "mechflow.features.profiles:load_side_sae")),
    D("transcoder_training", dictionaries.TranscoderTraining, "dictionaries/transcoder/training.json",
      "mechflow.dictionaries.transcoder:train_transcoder",
      ("mechflow.dictionaries.evaluate:evaluate_transcoder", "mechflow.dictionaries.evaluate:evaluate_dictionary")),
    D("sae_data_state", dictionaries.SaeDataState,
      "dictionaries/.sae.checkpoints/<n>/data_state.json (resume state)",
      "mechflow.dictionaries.sae:train_sae", ("mechflow.dictionaries.sae:train_sae",)),
    D("transcoder_index", dictionaries.TranscoderIndex, "dictionaries/transcoder/transcoder.json",
      "mechflow.dictionaries.transcoder:train_transcoder",
      ("mechflow.dictionaries.transcoder:read_transcoder_index",)),
    D("clt_config", dictionaries.CltConfig, "dictionaries/transcoder/clt_cfg.json (kind clt)",
      "mechflow.dictionaries.transcoder:save_stack", ("mechflow.dictionaries.transcoder:load_transcoder",)),
    D("sae_metrics", dictionaries.DictionaryMetrics, "dictionaries/sae_metrics.json",
      "mechflow.dictionaries.evaluate:evaluate_dictionary", ("mechflow.summary.core:summarize",)),
    D("transcoder_metrics", dictionaries.TranscoderMetrics, "dictionaries/transcoder_metrics.json",
      "mechflow.dictionaries.evaluate:evaluate_transcoder", ("mechflow.summary.core:summarize",)),
    D("feature_record", features.FeatureRecord, "features/features.jsonl (one per line)",
      "mechflow.features.records:write_feature_records"),
    D("feature_summary", features.FeatureSummary, "features/summary.json", "mechflow.features.stage:features"),
    D("agreement", attribution.Agreement, "attribution/{task}/agreement.json",
      "mechflow.attribution.stage:attribute", ("mechflow.summary.core:summarize",)),
    D("circuit", circuits.CircuitFile, "circuits/{task}/circuit.json", "mechflow.circuits.result:write_circuit",
      ("mechflow.circuits.result:read_circuit", "mechflow.stats.readers:read_circuit_data",
       "mechflow.reference.stage:circuit_scores", "mechflow.summary.core:summarize")),
    D("edge_reference_footer", reference.EdgeReferenceDocument,
      "reference/{task}/edge_reference.parquet (footer key mechflow.edge_reference)",
      "mechflow.reference.edges:write_edge_reference", ("mechflow.reference.edges:read_edge_reference",)),
    D("auc", reference.AucDocument, "reference/{task}/auc.json", "mechflow.reference.stage:reference"),
    D("stability", stats.StabilityDocument, "stats/{task}/stability.json", "mechflow.stats.stage:stats",
      ("mechflow.stats.report",)),
    D("fcas", stats.FcasDocument, "cross_model/{pair}/{task}/fcas.json", "mechflow.stats.stage:cross_model",
      ("mechflow.stats.report:cross_model_markdown",)),
    D("cka", stats.CkaDocument, "cross_model/{pair}/{task}/cka.json", "mechflow.stats.stage:cross_model",
      ("mechflow.stats.report:cross_model_markdown",)),
    D("feature_matching", stats.FeatureMatchingDocument, "cross_model/{pair}/features/feature_matching.json",
      "mechflow.features.matching_report:write_matching"),
    D("transcoder_set_training", dictionaries.TranscoderTraining,
      "dictionaries/transcoder_set/layer_{layer}/training.json", "mechflow.dictionaries.transcoder:train_transcoder",
      ("mechflow.dictionaries.transcoder_set:transcoder_set",)),
    D("transcoder_set", dictionaries.TranscoderSetDocument, "dictionaries/transcoder_set/set.json",
      "mechflow.dictionaries.transcoder_set:transcoder_set",
      ("mechflow.graphs.stage:attribution_graph", "mechflow.features.transcoders:transcoder_features")),
    D("transcoder_features_summary", features.TranscoderFeaturesSummary,
      "dictionaries/transcoder_set/features/summary.json", "mechflow.features.transcoders:transcoder_features"),
    D("steer_record", steer.InterventionRecord, "steer/{task}/interventions.jsonl (one per line)",
      "mechflow.steer.stage:steer"),
    D("steer_activation", steer.ActivationRecord, "steer/{task}/activations.jsonl (one per line)",
      "mechflow.steer.stage:activation_records"),
    D("steer_summary", steer.SteerSummary, "steer/{task}/summary.json", "mechflow.steer.stage:steer"),
    D("audit_exchange", audit.StoredExchange, "audit/responses.jsonl (one per line)", "mechflow.audit.stage:audit"),
    D("audit_score", audit.ScoreRecord, "audit/scores.jsonl (one per line)", "mechflow.audit.stage:audit"),
    D("audit_summary", audit.AuditSummary, "audit/summary.json", "mechflow.audit.stage:audit",
      ("mechflow.report.collect:Collector.block_audit",)),
    D("measured_costs", plan.MeasuredCosts, "mechflow/plan/data/measured_costs.json (package data; make bench: "
      "results/benchmarks/measured_costs.json)", "mechflow.plan.measure:measure",
      ("mechflow.plan.costs:load_costs",)),
    D("graph_summary", graphs.GraphSummary, "graphs/{task}/p{prompt}/graph.json",
      "mechflow.graphs.stage:attribution_graph", ("mechflow.graphs.stage:graphs_summary",)),
    D("neuronpedia_graph", graphs.NeuronpediaGraph, "graphs/{task}/{task}-p{prompt}.json",
      "mechflow.graphs.export:write_graph_json", ("mechflow.graphs.stage:graphs_summary",)),
    D("graph_supernodes", graphs.SupernodesDocument, "graphs/{task}/p{prompt}/supernodes.json",
      "mechflow.graphs.stage:attribution_graph"),
    D("graph_metadata", graphs.GraphMetadataIndex, "graphs/{task}/graph-metadata.json",
      "mechflow.graphs.stage:graphs_summary"),
    D("acdc", benchmark.AcdcDocument, "benchmark/{task}/acdc.json", "mechflow.benchmark.core:run_acdc"),
    D("timings", benchmark.TimingsDocument, "benchmark/{task}/timings.json",
      "mechflow.benchmark.stage:benchmark"),
    D("provider_file", report.ProviderFile, "user file: config/report/provider.yaml (YAML; report.provider_file)",
      "(user)", ("mechflow.report.stage:read_provider",)),
    D("report", report.ReportDocument, "report/report.json", "mechflow.report.stage:report"),
)

T = TableContract
_ATTRIBUTE = "mechflow.attribution.stage:attribute"
_ANALYZE = "mechflow.attribution.analyze:analyze"
_REPORT = "mechflow.attribution.analysis_report:analysis_markdown"
TABLES: tuple[TableContract, ...] = (
    T("activations", pq_contracts.activations_schema(1, "float32"), "harvest/{hook}/part-NNNNN.parquet",
      "mechflow.harvest.shards:write_shard",
      ("mechflow.harvest.shards:iter_activation_batches", "mechflow.dictionaries.data:ShardSource",
       "mechflow.summary.core:summarize"),
      "one row per token; footer mechflow.dtype = float32 | float16 | bfloat16 (stored as uint16 upper halves)",
      {"activation": "fixed_size_list<float32 | float16 | uint16 (bfloat16 bits)>[d]"}),
    T("corpus_tokens", pq_contracts.CORPUS_SCHEMA, "corpus/tokens.parquet", "mechflow.corpus.core:prepare_corpus",
      ("mechflow.corpus.core:read_contexts", "mechflow.dictionaries.evaluate:read_contexts"),
      "one row per context of exactly context_size tokens"),
    T("node_scores", pq_contracts.NODE_SCORES_SCHEMA, "attribution/{task}/node_scores.parquet", _ATTRIBUTE,
      ("mechflow.stats.readers:read_node_scores", "mechflow.reference.stage:node_part"),
      "one row per (method, component, prompt); component = MIB name, head -1 for MLPs"),
    T("prompts", pq_contracts.PROMPTS_SCHEMA, "attribution/{task}/prompts.parquet", _ATTRIBUTE,
      ("mechflow.stats.readers:read_prompts", "mechflow.reference.stage:node_part"), "one row per prompt"),
    T("head_types", pq_contracts.HEAD_TYPES_SCHEMA, "attribution/{task}/head_types.parquet", _ATTRIBUTE,
      ("mechflow.stats.readers:read_head_labels",), "one row per head; ioi_role only for IOI tasks"),
    T("lens", pq_contracts.LENS_SCHEMA, "attribution/{task}/lens.parquet", _ATTRIBUTE, (),
      "one row per logit-lens point"),
    T("dla", pq_contracts.DLA_SCHEMA, "attribution/{task}/dla.parquet", _ATTRIBUTE, (),
      "one row per direct-logit-attribution term"),
    T("ablations", pq_contracts.ABLATIONS_SCHEMA, "attribution/{task}/ablations.parquet", _ANALYZE,
      (_ANALYZE, _REPORT), "one row per (ablation method, component, prompt); head -1 for MLPs"),
    T("saliency", pq_contracts.SALIENCY_SCHEMA, "attribution/{task}/saliency.parquet", _ANALYZE, (_REPORT,),
      "one row per (saliency method, prompt, position)"),
    T("neurons", pq_contracts.NEURONS_SCHEMA, "attribution/{task}/neurons.parquet", _ANALYZE, (_ANALYZE, _REPORT),
      "one row per (method, top neuron, top-activating context)"),
    T("causal_tracing", pq_contracts.CAUSAL_TRACING_SCHEMA, "attribution/{task}/causal_tracing.parquet",
      "mechflow.attribution.causal_trace:causal_trace", ("mechflow.attribution.causal_trace:causal_trace", _REPORT),
      "one row per (restored kind, layer, position, prompt); tasks with subjects only"),
    T("circuit_prompts", pq_contracts.CIRCUIT_PROMPTS_SCHEMA, "circuits/{task}/circuit_prompts.parquet",
      "mechflow.circuits.stage:write_circuit_outputs", ("mechflow.stats.readers:read_circuit_data",),
      "one row per prompt; footer mechflow.unit"),
    T("curve_prompts", pq_contracts.CURVE_PROMPTS_SCHEMA, "circuits/{task}/curve_prompts.parquet",
      "mechflow.circuits.stage:write_circuit_outputs", ("mechflow.stats.readers:read_circuit_data",),
      "one row per (budget, prompt) of an edge circuit; footer mechflow.unit"),
    T("node_curve_prompts", pq_contracts.NODE_CURVE_PROMPTS_SCHEMA, "circuits/{task}/curve_prompts.parquet",
      "mechflow.circuits.stage:write_circuit_outputs", ("mechflow.stats.readers:read_circuit_data",),
      "one row per (budget, prompt) of a node circuit; footer mechflow.unit = nodes"),
    T("edge_scores", pq_contracts.EDGE_SCORES_SCHEMA, "circuits/{task}/edge_scores.parquet",
      "mechflow.circuits.stage:write_circuit_outputs", ("mechflow.reference.stage:circuit_scores",),
      "every edge of an edge circuit's graph, best first; footer mechflow.unit = edges"),
    T("node_ranking", pq_contracts.NODE_RANKING_SCHEMA, "circuits/{task}/edge_scores.parquet",
      "mechflow.circuits.stage:write_circuit_outputs", (),
      "every node of a node circuit's graph, best first; footer mechflow.unit = nodes"),
    T("edge_reference", pq_contracts.EDGE_REFERENCE_SCHEMA, "reference/{task}/edge_reference.parquet",
      "mechflow.reference.edges:write_edge_reference", ("mechflow.reference.stage:edge_part",),
      "one row per edge removed alone; footer document: edge_reference_footer"),
    T("task_attribution", pq_contracts.TASK_ATTRIBUTION_SCHEMA, "features/task_attribution.parquet",
      "mechflow.features.stage:write_task_attribution", (), "one row per (task, SAE latent)"),
    T("bootstrap", pq_contracts.BOOTSTRAP_SCHEMA, "stats/{task}/bootstrap.parquet",
      "mechflow.stats.stage:stats", ("mechflow.stats.report",), "one row per bootstrapped quantity"),
    T("cka", pq_contracts.CKA_SCHEMA, "cross_model/{pair}/{task}/cka.parquet", "mechflow.stats.output:summarize_cka",
      (), "one row per (layer of A, layer of B)"),
    T("transcoder_top_contexts", pq_contracts.TRANSCODER_TOP_CONTEXTS_SCHEMA,
      "dictionaries/transcoder_set/features/top_contexts.parquet", "mechflow.features.transcoders:transcoder_features",
      ("mechflow.graphs.stage:feature_details",),
      "one row per (layer, feature, rank) of a live feature's top contexts"),
    T("transcoder_feature_stats", pq_contracts.TRANSCODER_FEATURE_STATS_SCHEMA,
      "dictionaries/transcoder_set/features/feature_stats.parquet",
      "mechflow.features.transcoders:transcoder_features", ("mechflow.graphs.stage:feature_details",),
      "one row per (layer, feature) of the transcoder set"),
    T("graph_validation", pq_contracts.GRAPH_VALIDATION_SCHEMA, "graphs/{task}/p{prompt}/validation.parquet",
      "mechflow.graphs.stage:attribution_graph", (), "one row per intervention on a top feature of the graph"),
    T("acdc_steps", pq_contracts.ACDC_STEPS_SCHEMA, "benchmark/{task}/acdc_steps.parquet",
      "mechflow.benchmark.core:run_acdc", (), "one row per ACDC decision"),
)


def document(name: str) -> DocumentContract:
    return next(d for d in DOCUMENTS if d.name == name)


def table(name: str) -> TableContract:
    return next(t for t in TABLES if t.name == name)
