"""Contracts of the report stage: the provider file it reads and the ``report.json`` it writes.

``report.json`` carries every number of ``report.pdf`` / ``report.md`` with its evidence (the result
file's path and sha256, the field it was read from). Where a field means what a field of the
CycloneDX 1.6 ML-BOM ``modelCard`` means, its description says so (``cyclonedx:``); ``report.json``
also carries the measured metrics as a CycloneDX ``modelCard`` fragment (``cyclonedx_model_card``).
Hugging Face ``model-index`` has no counterpart here: its results need Hub-registered datasets.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mechflow.contracts.documents import Document, VersionedDocument

Scalar = float | int | str | bool | None


class ProviderFile(Document):
    """``config/report/provider.yaml``: what only the provider of the AI system can state.

    Every key is optional: a missing or null key is printed as "To be completed by the provider"
    and counted in the report's completeness table. Unknown keys are an error (a misspelt key would
    otherwise silently leave its field empty).
    """

    provider_name: str | None = Field(None, description="name of the provider (Annex IV 1(a))")
    provider_contact: str | None = Field(None, description="address / contact of the provider (Annex IV 1(a))")
    system_name: str | None = Field(None, description="name of the AI system that contains the model (1(a))")
    system_version: str | None = Field(None, description="version of the system and its relation to previous "
                                       "versions (1(a))")
    intended_purpose: str | None = Field(None, description="intended purpose of the AI system (1(a), Art. 3(12))")
    risk_classification: str | None = Field(None, description="the provider's own classification of the system "
                                            "(e.g. the Annex III point it falls under); the report prints it only "
                                            "when stated here and never derives one")
    interactions: str | None = Field(None, description="hardware/software/AI systems it interacts with (1(b))")
    software_update_requirements: str | None = Field(None, description="requirements related to version updates "
                                                     "(1(c))")
    forms_placed_on_market: str | None = Field(None, description="forms in which the system is placed on the "
                                               "market or put into service (1(d))")
    hardware: str | None = Field(None, description="hardware on which the system is intended to run (1(e))")
    product_illustrations: str | None = Field(None, description="where the system is a product component: "
                                              "illustrations, marking, internal layout (1(f))")
    user_interface: str | None = Field(None, description="user interface provided to the deployer (1(g))")
    instructions_for_use: str | None = Field(None, description="instructions for use for the deployer (1(h))")
    development_methods: str | None = Field(None, description="methods and steps of development, use of "
                                            "pre-trained systems and third-party tools (2(a))")
    design_specifications: str | None = Field(None, description="general logic, key design choices, rationale "
                                              "and assumptions, persons or groups concerned (2(b))")
    system_architecture: str | None = Field(None, description="how software components build on each other; "
                                            "compute used to develop, train, test, validate (2(c))")
    training_data: str | None = Field(None, description="datasheets of the training data: provenance, scope, "
                                      "selection, labelling, cleaning (2(d))")
    human_oversight_measures: str | None = Field(None, description="human oversight measures (Art. 14) and "
                                                 "their assessment (2(e), 3)")
    predetermined_changes: str | None = Field(None, description="pre-determined changes and how compliance is "
                                              "kept (2(f))")
    test_sign_off: str | None = Field(None, description="who signed the test logs and reports, and when (2(g))")
    cybersecurity_measures: str | None = Field(None, description="cybersecurity measures (2(h), Art. 15)")
    accuracy_for_groups: str | None = Field(None, description="expected accuracy for the persons or groups the "
                                            "system is intended to be used on (3)")
    foreseeable_risks: str | None = Field(None, description="foreseeable unintended outcomes and sources of "
                                          "risk (3)")
    input_data_specifications: str | None = Field(None, description="specifications on input data (3)")
    metrics_appropriateness: str | None = Field(None, description="why the performance metrics are appropriate "
                                                "for the system (4)")
    risk_management_system: str | None = Field(None, description="the risk-management system (5, Art. 9)")
    lifecycle_changes: str | None = Field(None, description="relevant changes made through the lifecycle (6)")
    standards_applied: list[str] | None = Field(None, description="harmonised standards / common specifications "
                                                "/ other standards actually applied (7); never filled by mechflow")
    standards_solutions: str | None = Field(None, description="where no harmonised standard is applied: the "
                                            "solutions adopted to meet Chapter III, Section 2 (7)")
    declaration_of_conformity: str | None = Field(None, description="the EU declaration of conformity (8, Art. 47)"
                                                  ", or where it is kept")
    post_market_monitoring_plan: str | None = Field(None, description="the post-market monitoring system and plan "
                                                    "(9, Art. 72)")


class Evidence(Document):
    """One result file the report cites."""

    id: str = Field(description="citation label used in the text, e.g. E3")
    path: str = Field(description="the file, relative to the working directory of the run (as in run_manifest.json)")
    sha256: str = Field(description="sha256 of the file, equal to the run manifest's record (checked when written)")
    stage: str = Field(description="the stage (results folder) that wrote it")
    in_manifest: bool = Field(description="run_manifest.json records this file and its sha256 was checked against "
                              "that record (every file a number is read from; figures may be unrecorded)")


class Number(Document):
    """A measured number and where it comes from. cyclonedx: a ``performanceMetrics`` entry (type = id, value =
    text, slice = label)."""

    id: str = Field(description="stable key, e.g. circuits.ioi.faithfulness")
    label: str = Field(description="what it is, in words")
    value: Scalar = Field(description="the value exactly as read from the file")
    text: str = Field(description="the value as printed in the PDF / Markdown")
    evidence: str = Field(description="id of the Evidence entry (file + sha256)")
    field: str = Field(description="where in the file: a JSON key path, or a Parquet/CSV row selection")


class Figure(Document):
    id: str
    path: str = Field(description="the PNG, relative to the working directory")
    caption: str
    evidence: str = Field(description="id of the Evidence entry of the PNG itself")


class Limitation(Document):
    """A finding listed as a limitation because a configured threshold decided so."""

    number: str = Field(description="id of the Number the threshold was applied to")
    threshold_key: str = Field(description="the report config key holding the threshold, e.g. report.faithfulness_min")
    threshold: Scalar
    text: str


class ProviderField(Document):
    key: str = Field(description="key of the provider file")
    label: str
    subpoints: list[str] = Field(description="the Annex IV points this field fills")
    value: str | list[str] | None = Field(description="the provider's text, or null when not provided")
    status: Literal["provided", "to be completed by the provider"]


class Block(Document):
    """A paragraph, a table of numbers, a figure, or a provider field inside a sub-point."""

    kind: Literal["text", "numbers", "figure", "provider", "table"]
    id: str | None = Field(None, description="name of a table block that `snakemake figures` also writes as "
                           "tables/<id>.csv and .tex")
    text: str | None = None
    title: str | None = None
    numbers: list[str] = Field(default_factory=list, description="ids of Numbers (kind numbers)")
    figure: str | None = Field(None, description="id of a Figure (kind figure)")
    provider_key: str | None = Field(None, description="key of a ProviderField (kind provider)")
    columns: list[str] = Field(default_factory=list, description="header of a table (kind table)")
    rows: list[list[str]] = Field(default_factory=list, description="cells of a table: text, or {N:id} references")


class SubPoint(Document):
    id: str = Field(description='Annex IV point, e.g. "1(a)" or "4"')
    legal_text: str = Field(description="the point's text in Regulation (EU) 2024/1689, Annex IV")
    filled_by: str = Field(description="what fills it: measured evidence, the provider file, or both")
    blocks: list[Block]


class Section(Document):
    number: int = Field(ge=1, le=9)
    heading: str = Field(description="the point's heading as the report prints it")
    subpoints: list[SubPoint]


class Reproducibility(Document):
    config_hash: str
    git_commit: str | None
    git_dirty: bool | None
    mechflow_version: str
    python: str
    platform: str
    packages: dict[str, str]
    model_source: str
    model_sha256: str | None = Field(description="sha256 of the model weights file (model_card.json)")
    resolved_config: str = Field(description="path of the run's resolved config")
    commands: list[str] = Field(description="commands that regenerate this report")
    started_at: str
    finished_at: str


class ReportDocument(VersionedDocument):
    """``report/report.json``: the Annex IV-structured technical evidence of one run."""

    run: str
    title: str
    nature: str = Field(description="what the document is and is not (printed on the title page)")
    model: str = Field(description="the model studied (mechflow's model name, config/model/<name>.yaml)")
    model_sha256: str | None
    config_hash: str
    generated_from: str = Field(description="run_manifest.json the report was checked against")
    completeness: dict[str, int] = Field(description="provider fields: provided / to be completed / total")
    provider_fields: list[ProviderField]
    sections: list[Section]
    limitations: list[Limitation]
    numbers: list[Number]
    figures: list[Figure]
    evidence: list[Evidence]
    reproducibility: Reproducibility
    cyclonedx_model_card: dict = Field(description="cyclonedx: a CycloneDX 1.6 ML-BOM modelCard fragment "
                                       "(modelParameters.architectureFamily, quantitativeAnalysis."
                                       "performanceMetrics, considerations.technicalLimitations) built from "
                                       "the same numbers")
