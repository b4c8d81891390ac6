"""Data contracts: every file format mechflow writes or reads is defined here and nowhere else.

* JSON documents: pydantic models by area (`tasks`, `corpus`, `harvest`, `dictionaries`,
  `features`, `attribution`, `circuits`, `reference`, `stats`, `benchmark`, run-level `models`), all
  ``extra="forbid"``; writers and readers go through `documents` (`write_document`,
  `read_document`, `load_document`).
* Parquet tables: pyarrow schemas in `parquet`.
* Names: MIB component names in `names`, TransformerLens hooks in `hooks`, file names in
  `filenames`.
* One schema-version policy: `versions`.
* `catalog` lists every layout with its writer and readers; `python -m mechflow.contracts.export`
  writes ``workflow/schemas/**`` from it (``--check``: fail on drift).

This package imports nothing above it (no stage package, no torch at import time).
"""

from mechflow.contracts.attribution import Agreement, MethodAgreement
from mechflow.contracts.benchmark import AcdcDocument, AcdcRunDocument, TimingsDocument
from mechflow.contracts.circuits import (
    CircuitEdgeEntry,
    CircuitFile,
    CircuitNodeEntry,
    CurvePointEntry,
    LogitDiffSpec,
    PromptSet,
    TargetMetricSpec,
)
from mechflow.contracts.corpus import CorpusManifest
from mechflow.contracts.dictionaries import (
    CltConfig,
    DictionaryMetrics,
    DictionaryTraining,
    ReconstructionMetrics,
    SaeDataState,
    SaeTraining,
    StackHeldoutMetrics,
    TranscoderIndex,
    TranscoderMetrics,
    TranscoderStackMetrics,
    TranscoderTraining,
)
from mechflow.contracts.documents import (
    Document,
    VersionedDocument,
    check_document,
    load_document,
    read_document,
    write_document,
)
from mechflow.contracts.features import FeatureRecord, FeatureSummary
from mechflow.contracts.harvest import HarvestIndex, HarvestIndexEntry, HarvestManifest, ShardInfo, ShardSidecar
from mechflow.contracts.models import ModelCard, RunManifest
from mechflow.contracts.reference import AucDocument, EdgeReferenceDocument
from mechflow.contracts.stats import CkaDocument, FcasDocument, FeatureMatchingDocument, StabilityDocument
from mechflow.contracts.tasks import TaskBaseline, TaskDatasetMeta, TaskDatasetRow, TaskExample, TokenizerDescription
from mechflow.contracts.versions import SCHEMA_VERSION, SCHEMA_VERSION_KEY, SchemaVersion

__all__ = [
    "SCHEMA_VERSION", "SCHEMA_VERSION_KEY", "AcdcDocument", "AcdcRunDocument", "Agreement", "AucDocument",
    "CircuitEdgeEntry", "CircuitFile", "CircuitNodeEntry", "CkaDocument", "CltConfig", "CorpusManifest",
    "CurvePointEntry", "DictionaryMetrics", "DictionaryTraining", "Document", "EdgeReferenceDocument",
    "FcasDocument", "FeatureMatchingDocument", "FeatureRecord", "FeatureSummary", "HarvestIndex", "HarvestIndexEntry",
    "HarvestManifest", "LogitDiffSpec", "MethodAgreement", "ModelCard", "PromptSet", "ReconstructionMetrics",
    "RunManifest", "SaeDataState", "SaeTraining", "SchemaVersion", "ShardInfo", "ShardSidecar",
    "StabilityDocument", "StackHeldoutMetrics", "TargetMetricSpec", "TaskBaseline", "TaskDatasetMeta",
    "TaskDatasetRow", "TaskExample", "TimingsDocument", "TokenizerDescription", "TranscoderIndex",
    "TranscoderMetrics", "TranscoderStackMetrics", "TranscoderTraining", "VersionedDocument", "check_document",
    "load_document", "read_document", "write_document",
]
