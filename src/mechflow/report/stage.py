"""Stage function of rule `report`: Annex IV-structured technical documentation of one run.

1. Read ``run_manifest.json`` (the run's record: config hash, versions, sha256 of every file).
2. Read the provider file (`ProviderFile`): what only the provider can state. Missing keys become
   "To be completed by the provider" fields, counted in the completeness table.
3. Walk Annex IV point by point (`mechflow.report.annex_iv.POINTS`): each point gets the provider
   fields and the measured evidence blocks (`mechflow.report.collect.Collector`) that fill it. Every
   number goes through the `Ledger`, which hashes its file and refuses one that no longer matches
   the manifest (changed after the run).
4. Limitations: the findings that cross a threshold of the report config, each naming threshold and file.
5. Write ``report.json`` (contract `ReportDocument`), ``report.md`` and ``report.pdf`` (reportlab
   platypus), each atomically. The report is evidence for a provider's documentation: it states no
   verdict, grade, risk class or standard that the provider did not state.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mechflow.config import REPO_ROOT
from mechflow.contracts.documents import read_document, write_document
from mechflow.contracts.models import RunManifest
from mechflow.contracts.report import (
    Block,
    Limitation,
    Number,
    ProviderField,
    ProviderFile,
    ReportDocument,
    Reproducibility,
    Section,
    SubPoint,
)
from mechflow.errors import ConfigError
from mechflow.io import sha256_file
from mechflow.report import annex_iv
from mechflow.report.collect import Collector
from mechflow.report.config import ReportConfig
from mechflow.report.evidence import Ledger
from mechflow.report.render import render_markdown, render_pdf, resolve

log = logging.getLogger(__name__)

NATURE = ("Annex IV-structured technical evidence from an interpretability study of the model, for the provider's "
          "technical documentation under Article 11 of Regulation (EU) 2024/1689. It is a drafting and "
          "evidence-assembly aid, not a conformity assessment: it states no verdict, grade, risk class or "
          "standard that the provider did not state. Annex IV applies to a high-risk AI system; the model studied "
          "here is a general-purpose component of such a system only where the provider says so. Every measured "
          "number cites the result file it was read from (path and sha256, evidence appendix); fields only the "
          "provider can fill are marked 'To be completed by the provider'.")


def provider_path(value: str | None) -> Path | None:
    """The provider file of ``report.provider_file``: relative to the working directory, else to the
    mechflow checkout (where the shipped template `config/report/provider.yaml` lives)."""
    if value is None:
        return None
    path = Path(value)
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path if (REPO_ROOT / path).exists() else path


def read_provider(path: Path | None) -> ProviderFile:
    """The provider file, validated; one ConfigError naming the file and the key on bad input."""
    if path is None:
        return ProviderFile()
    if not Path(path).exists():
        raise ConfigError(f"report.provider_file: {path} does not exist; write it (template: "
                          "config/report/provider.yaml) or set report.provider_file=null")
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc}); fix the file") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of provider keys, got {type(raw).__name__}")
    try:
        return ProviderFile.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{path}: unknown key {key!r}; valid keys are {list(ProviderFile.model_fields)}") \
                from None
        raise ConfigError(f"{path}: {key}: {err['msg']} (got {err.get('input')!r}); "
                          f"{ProviderFile.model_fields[str(err['loc'][0])].description}") from None


def provider_fields(provider: ProviderFile) -> list[ProviderField]:
    where: dict[str, list[str]] = {}
    for section in annex_iv.POINTS:
        for point in section.points:
            for key in point.provider:
                where.setdefault(key, []).append(point.id)
    out = []
    for key in annex_iv.provider_keys():
        value = getattr(provider, key)
        if isinstance(value, str) and not value.strip():
            value = None
        description = ProviderFile.model_fields[key].description or key
        label = re.sub(r"\s*\((?:[^()]|\([^()]*\))*\)$", "", description)  # drop the trailing "(1(a))" point reference
        out.append(ProviderField(key=key, label=label, subpoints=where[key], value=value,
                                 status="provided" if value else "to be completed by the provider"))
    return out


def _limitations_block(collector: Collector, ledger: Ledger) -> Block:
    if not collector.limitations:
        return Block(kind="text", text="No measured finding crossed a threshold of the report config.")
    files = {e.id: e.path for e in ledger.evidence.values()}
    rows = [[lim.text, f"{lim.threshold_key} = {lim.threshold}", files[ledger.numbers[lim.number].evidence]]
            for lim in collector.limitations]
    return Block(kind="table", id="limitations", title="Limitations found in the measurements",
                 columns=["finding", "threshold", "file"], rows=rows)


def _cyclonedx(numbers: dict[str, Number], limitations: list[Limitation], card_name: str, architecture: str) -> dict:
    """A CycloneDX 1.6 ``modelCard`` fragment carrying the same numbers: each numeric number is a
    ``performanceMetrics`` entry whose ``type`` is the number's id in report.json (where its evidence
    is: CycloneDX has no field for a source file), ``value`` its printed value and ``slice`` its label.
    The training approach is left out: it is the provider's to state."""
    metrics = []
    for n in numbers.values():
        if isinstance(n.value, (int, float)) and not isinstance(n.value, bool):
            metrics.append({"type": n.id, "value": n.text, "slice": n.label})
    return {"bom-ref": f"model-card:{card_name}",
            "modelParameters": {"architectureFamily": architecture},
            "quantitativeAnalysis": {"performanceMetrics": metrics},
            "considerations": {"technicalLimitations": [resolve(lim.text, numbers, cite=False) for lim in limitations]}}


def build_report(cfg: ReportConfig, *, run_manifest: Path, provider: ProviderFile, run: str,
                 commands: list[str], paper_figures: dict[str, Path] | None = None) -> ReportDocument:
    """The report document of a run (nothing written)."""
    manifest_path = Path(run_manifest)
    manifest = read_document(manifest_path, RunManifest, fix="re-run the run_manifest rule")
    recorded = {**manifest.inputs, **manifest.outputs, str(manifest_path): sha256_file(manifest_path)}
    ledger = Ledger(recorded, manifest_path)
    collector = Collector(cfg, ledger, manifest_path.parent, manifest, manifest_path, run, paper_figures)
    fields = provider_fields(provider)
    sections = []
    for sec in annex_iv.POINTS:
        subpoints = []
        for point in sec.points:
            blocks = [Block(kind="provider", provider_key=k) for k in point.provider]
            for key in point.measured:
                blocks += collector.blocks(key)
            parts = [p for p in ("measured evidence" if point.measured else "",
                                 "the provider file" if point.provider else "") if p]
            subpoints.append(SubPoint(id=point.id, legal_text=point.text, filled_by=" and ".join(parts), blocks=blocks))
        sections.append(Section(number=sec.number, heading=f"{sec.number}. {sec.heading}", subpoints=subpoints))
    collector.stage_figures("*.png")  # every figure of the stages: evidence (Appendix A), not embedded
    if paper_figures and "dag" in paper_figures:  # drawn in the reproducibility appendix
        ledger.figure("figures.dag", paper_figures["dag"], "The rules of this run and how their files feed each "
                      "other (snakemake --rulegraph).")
    limitations = _limitations_block(collector, ledger)
    for section in sections:
        for point in section.subpoints:
            point.blocks = [limitations if b.kind == "text" and b.title == "limitations" and b.text is None else b
                            for b in point.blocks]
    provided = sum(f.status == "provided" for f in fields)
    card = manifest.model
    return ReportDocument(
        run=run, title=cfg.title, nature=NATURE, model=card.name if card else run,
        model_sha256=card.source_sha256 if card else None, config_hash=manifest.config_hash,
        generated_from=str(manifest_path),
        completeness={"provided": provided, "to_be_completed": len(fields) - provided, "total": len(fields)},
        provider_fields=fields, sections=sections, limitations=collector.limitations,
        numbers=list(ledger.numbers.values()), figures=list(ledger.figures.values()),
        evidence=list(ledger.evidence.values()),
        reproducibility=Reproducibility(
            config_hash=manifest.config_hash, git_commit=manifest.git_commit, git_dirty=manifest.git_dirty,
            mechflow_version=manifest.mechflow_version, python=manifest.python, platform=manifest.platform,
            packages=manifest.packages, model_source=card.source if card else "",
            model_sha256=card.source_sha256 if card else None,
            resolved_config=str(manifest_path.parent / "config.resolved.yaml"), commands=commands,
            started_at=manifest.started_at, finished_at=manifest.finished_at),
        cyclonedx_model_card=_cyclonedx(ledger.numbers, collector.limitations, card.name if card else run,
                                        card.architecture if card else ""),
    )


def regenerate_commands(run: str, overrides: list[str]) -> list[str]:
    quoted = ",".join(f'"{o}"' for o in overrides)
    config = f" --config 'overrides=[{quoted}]'" if overrides else ""
    return [f"snakemake --cores 2 --workflow-profile workflow/profiles/default{config} results/{run}/report/report.pdf",
            f"snakemake figures --cores 2{config}",  # targets before --config, which takes every word after it
            f"snakemake --cores 2{config} --report results/{run}/snakemake_report.zip"]


def report(cfg: ReportConfig, *, run_manifest: Path, report_pdf: Path, report_json: Path, report_md: Path, run: str,
           overrides: list[str] = (), resolved_config: Path | None = None,
           paper_figures: list[Path] = ()) -> dict[str, Any]:
    """Write report.json, report.md and report.pdf of `run` (see the module docstring); `paper_figures`
    are the PNGs of `snakemake figures` (`mechflow.report.figures`), embedded where their numbers are."""
    provider = read_provider(provider_path(cfg.provider_file))
    doc = build_report(cfg, run_manifest=run_manifest, provider=provider, run=run,
                       commands=regenerate_commands(run, list(overrides)),
                       paper_figures={Path(p).stem: Path(p) for p in paper_figures})
    payload = doc.model_dump(mode="json")
    resolved_text = Path(resolved_config).read_text() if resolved_config else ""
    render_pdf(doc, report_pdf, resolved_text, cfg)  # first: the slowest, and the one most likely to fail
    render_markdown(doc, report_md)
    write_document(report_json, ReportDocument, payload)
    log.info("report: %d numbers from %d files, %d limitations, provider fields %d/%d -> %s", len(doc.numbers),
             len(doc.evidence), len(doc.limitations), doc.completeness["provided"], doc.completeness["total"],
             report_pdf)
    return {"n_numbers": len(doc.numbers), "n_evidence": len(doc.evidence), "n_limitations": len(doc.limitations),
            "provider_fields_to_complete": doc.completeness["to_be_completed"]}
