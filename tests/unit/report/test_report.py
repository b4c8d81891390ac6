"""The report stage on a small run folder: provider file, evidence hashing, limitations from data,
JSON schema, Markdown, and the PDF read back with poppler (every heading and number present).

The full content (circuits, reference AUCs, statistics, dictionaries, graphs) is checked on the
smoke run's report (tests/workflow/test_dag.py::test_smoke_run_end_to_end)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest

from mechflow.contracts.documents import write_document
from mechflow.contracts.models import ModelCard
from mechflow.contracts.tasks import TaskBaseline
from mechflow.errors import ConfigError, DataError
from mechflow.io import sha256_file
from mechflow.report import annex_iv
from mechflow.report.config import ReportConfig
from mechflow.report.evidence import format_value
from mechflow.report.stage import read_provider, report
from mechflow.workflow.provenance import write_run_manifest

ROOT = Path(__file__).resolve().parents[3]
RUN = Path("results/r")


def _baseline(task: str, verdict: str, accuracy: float) -> dict:
    return {"task": task, "kind": task, "metric": "logit_diff", "model": "tiny", "config_hash": "c" * 64,
            "dataset_sha256": "d" * 64, "meta_sha256": "e" * 64, "n_prompts": 12, "clean_metric_mean": 1.25,
            "corrupted_metric_mean": -0.5, "accuracy": accuracy, "chance_accuracy": 0.5, "chance_metric_mean": 0.0,
            "p_value_accuracy": 0.0123, "p_value_clean_vs_corrupted": 0.002, "verdict": verdict, "per_prompt": []}


@pytest.fixture
def run(tmp_path, monkeypatch):
    """A run folder with a model card, two task baselines (one failed) and its run manifest."""
    monkeypatch.chdir(tmp_path)
    card = write_document(RUN / "model_card.json", ModelCard, {
        "name": "tiny", "architecture": "LlamaForCausalLM", "n_layers": 2, "n_heads": 4, "d_model": 64, "d_mlp": 256,
        "d_vocab": 1000, "source": "weights.gguf", "source_sha256": "a" * 64, "dtype": "float32",
        "prepend_bos": True})
    ioi = write_document(RUN / "tasks/ioi/baseline.json", TaskBaseline, _baseline("ioi", "above chance", 0.9167))
    gt = write_document(RUN / "tasks/greater_than/baseline.json", TaskBaseline,
                        _baseline("greater_than", "FAILS: accuracy 0.4 is not above chance", 0.4))
    resolved = RUN / "config.resolved.yaml"
    resolved.write_text("# mechflow resolved config\nseed: 0\n")
    write_run_manifest({"seed": 0}, resolved_config=resolved, inputs=[], outputs=[resolved, card, ioi, gt],
                       model_card=card, run_manifest=RUN / "run_manifest.json", run="r")
    return tmp_path


def _outputs() -> dict[str, Path]:
    return {"report_pdf": RUN / "report/report.pdf", "report_json": RUN / "report/report.json",
            "report_md": RUN / "report/report.md"}


def _report(cfg: ReportConfig) -> dict:
    return report(cfg, run_manifest=RUN / "run_manifest.json", run="r", resolved_config=RUN / "config.resolved.yaml",
                  **_outputs())


def _pdf_text(poppler: Path, pdf: Path) -> str:
    return subprocess.run([str(poppler / "pdftotext"), str(pdf), "-"], capture_output=True, text=True,
                          check=True).stdout


def squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


def test_report_of_a_run(run, poppler):
    provider = Path("provider.yaml")
    provider.write_text("provider_name: Example Provider GmbH\nstandards_applied: [ISO/IEC 42001:2023]\n")
    summary = _report(ReportConfig.from_dict({"provider_file": str(provider)}))
    doc = json.loads((RUN / "report/report.json").read_text())
    schema = json.loads((ROOT / "workflow/schemas/contracts/report.schema.json").read_text())
    jsonschema.validate(doc, schema)
    # provider fields: the two given are printed, every other one is marked and counted
    fields = {f["key"]: f for f in doc["provider_fields"]}
    assert fields["provider_name"]["status"] == "provided" and fields["standards_applied"]["value"] == [
        "ISO/IEC 42001:2023"]
    assert doc["completeness"] == {"provided": 2, "to_be_completed": len(fields) - 2, "total": len(fields)}
    assert summary["provider_fields_to_complete"] == len(fields) - 2
    assert set(fields) == set(annex_iv.provider_keys())
    # the Annex structure: nine points, sub-points (a)-(h) of points 1 and 2
    assert [s["number"] for s in doc["sections"]] == list(range(1, 10))
    assert [p["id"] for p in doc["sections"][0]["subpoints"]] == [f"1({c})" for c in "abcdefgh"]
    assert [p["id"] for p in doc["sections"][1]["subpoints"]] == [f"2({c})" for c in "abcdefgh"]
    # every number cites a file the run manifest records, whose sha256 is re-hashed here
    evidence = {e["id"]: e for e in doc["evidence"]}
    for n in doc["numbers"]:
        ev = evidence[n["evidence"]]
        assert ev["in_manifest"], n
        assert sha256_file(ev["path"]) == ev["sha256"], ev["path"]
    numbers = {n["id"]: n for n in doc["numbers"]}
    assert numbers["tasks.ioi.accuracy"]["value"] == 0.9167 and numbers["model.sha256"]["value"] == "a" * 64
    # the failed task is a limitation, decided by its verdict and naming it; the passed one is not
    assert [lim["number"] for lim in doc["limitations"]] == ["tasks.greater_than.verdict"]
    # every block's number references resolve
    for section in doc["sections"]:
        for point in section["subpoints"]:
            for block in point["blocks"]:
                cells = [block.get("text") or ""] + [c for row in block["rows"] for c in row]
                for ref in re.findall(r"\{N:([^{}]+)\}", " ".join(cells)) + block["numbers"]:
                    assert ref in numbers, ref
    # PDF: every section heading, every sub-point, every number, the provider markers
    text = _pdf_text(poppler, RUN / "report/report.pdf")
    flat = squash(text)
    for section in doc["sections"]:
        assert squash(section["heading"]) in flat, section["heading"]
        for point in section["subpoints"]:
            assert squash(point["legal_text"][:60]) in flat, point["id"]
    for n in doc["numbers"]:
        assert squash(n["text"]) in flat, (n["id"], n["text"])
    for e in doc["evidence"]:
        assert e["sha256"] in flat and squash(e["path"]) in flat
    assert text.count("TO BE COMPLETED BY THE PROVIDER") == doc["completeness"]["to_be_completed"]
    assert "Example Provider GmbH" in text and "ISO/IEC 42001:2023" in text
    assert not re.search(r"\bcompliant\b", text, re.IGNORECASE)  # evidence, never a verdict
    info = subprocess.run([str(poppler / "pdfinfo"), str(RUN / "report/report.pdf")], capture_output=True,
                          text=True, check=True).stdout
    assert "Annex IV" in info and "mechflow" in info  # document metadata
    assert "Contents" in text and "Appendix A. Evidence files" in text
    md = (RUN / "report/report.md").read_text()
    for n in doc["numbers"]:
        assert n["text"] in md
    assert md.count("**To be completed by the provider**") == doc["completeness"]["to_be_completed"]


def test_report_pages_render(run, poppler, tmp_path):
    _report(ReportConfig.from_dict({"provider_file": None}))
    first = {k: p.read_bytes() for k, p in _outputs().items()}
    _report(ReportConfig.from_dict({"provider_file": None}))
    assert {k: p.read_bytes() for k, p in _outputs().items()} == first  # same run, same bytes (PDF included)
    pages = int(re.search(r"Pages:\s+(\d+)", subprocess.run(
        [str(poppler / "pdfinfo"), str(RUN / "report/report.pdf")], capture_output=True, text=True,
        check=True).stdout).group(1))
    subprocess.run([str(poppler / "pdftoppm"), "-r", "40", "-png", str(RUN / "report/report.pdf"),
                    str(tmp_path / "page")], check=True)
    pngs = sorted(tmp_path.glob("page-*.png"))
    assert len(pngs) == pages >= 5
    assert all(p.stat().st_size > 1000 for p in pngs)


def test_a_cited_file_changed_after_the_run_is_refused(run):
    path = RUN / "tasks/ioi/baseline.json"
    path.write_text(path.read_text().replace("0.9167", "0.99"))
    with pytest.raises(DataError, match=r"tasks/ioi/baseline.json changed after the run"):
        _report(ReportConfig.from_dict({"provider_file": None}))
    assert not any(p.exists() for p in _outputs().values())  # no partial output


def test_provider_file_errors_name_the_key(tmp_path):
    bad = tmp_path / "provider.yaml"
    bad.write_text("provider_nmae: X\n")
    with pytest.raises(ConfigError, match=r"provider.yaml: unknown key 'provider_nmae'; valid keys are"):
        read_provider(bad)
    bad.write_text("standards_applied: ISO 1\n")
    with pytest.raises(ConfigError, match=r"provider.yaml: standards_applied: Input should be a valid list"):
        read_provider(bad)
    with pytest.raises(ConfigError, match=r"report.provider_file: .*missing.yaml does not exist"):
        read_provider(tmp_path / "missing.yaml")


def test_shipped_provider_template_states_nothing():
    provider = read_provider(ROOT / "config/report/provider.yaml")
    assert all(v is None for v in provider.model_dump().values())
    assert set(annex_iv.provider_keys()) == set(provider.model_dump())  # every key has its Annex point


@pytest.mark.parametrize("value, text", [(0.80641, "0.8064"), (12, "12"), (3.2e-5, "3.200e-05"), (None, "n/a"),
                                         (True, "yes"), ("above chance", "above chance"), (1234.5678, "1235")])
def test_format_value(value, text):
    assert format_value(value) == text


RULEGRAPH = """digraph snakemake_dag {
    graph[bgcolor=white, margin=0];
	0[label = "all", color = "0.00 0.6 0.85", style="rounded"];
	1[label = "run_manifest", color = "0.52 0.6 0.85", style="rounded"];
	2[label = "evaluate_task", color = "0.21 0.6 0.85", style="rounded"];
	3[label = "prepare_task", color = "0.44 0.6 0.85", style="rounded"];
	1 -> 0
	2 -> 1
	3 -> 2
	3 -> 1
}
"""


def test_paper_figures_and_tables(run, poppler):
    """`snakemake figures`' stage function on the small run: every figure as PNG and PDF, every table as
    CSV and LaTeX, each row naming its evidence file; the report then embeds the figures."""
    from mechflow.report.figures import FIGURES, TABLES, paper_figures, parse_rulegraph

    assert parse_rulegraph(RULEGRAPH) == ({"0": "all", "1": "run_manifest", "2": "evaluate_task",
                                           "3": "prepare_task"}, [("1", "0"), ("2", "1"), ("3", "2"), ("3", "1")])
    Path("rulegraph.dot").write_text(RULEGRAPH)
    png = [RUN / f"figures/{n}.png" for n in FIGURES]
    pdf = [RUN / f"figures/{n}.pdf" for n in FIGURES]
    tables = [RUN / f"tables/{n}.{ext}" for n in TABLES for ext in ("csv", "tex")]
    paper_figures(ReportConfig(), run_manifest=RUN / "run_manifest.json", rulegraph=Path("rulegraph.dot"), png=png,
                  pdf=pdf, tables=tables, run="r")
    assert all(p.stat().st_size > 3000 for p in png) and all(p.read_bytes().startswith(b"%PDF") for p in pdf)
    first = [p.read_bytes() for p in png + pdf]
    paper_figures(ReportConfig(), run_manifest=RUN / "run_manifest.json", rulegraph=Path("rulegraph.dot"), png=png,
                  pdf=pdf, tables=tables, run="r")
    assert [p.read_bytes() for p in png + pdf] == first  # regenerated from the same data: the same bytes
    tasks = (RUN / "tables/tasks.csv").read_text().splitlines()
    assert tasks[0] == "task,prompts,accuracy,chance,mean metric,p-value,verdict,evidence"
    assert tasks[2].startswith("ioi,12,0.9167,0.5,1.25,0.0123,above chance,results/r/tasks/ioi/baseline.json")
    tex = (RUN / "tables/tasks.tex").read_text()
    assert "greater\\_than" in tex and "\\toprule" in tex and "\\caption{tiny: tasks (run r;" in tex
    assert (RUN / "tables/circuits.csv").read_text().strip() == "note\nnot computed in this run"
    report(ReportConfig.from_dict({"provider_file": None}), run_manifest=RUN / "run_manifest.json", run="r",
           resolved_config=RUN / "config.resolved.yaml", paper_figures=png, **_outputs())
    doc = json.loads((RUN / "report/report.json").read_text())
    assert {f["id"] for f in doc["figures"]} == {"figures.tasks", "figures.dag"}  # the others have no data here
    text = _pdf_text(poppler, RUN / "report/report.pdf")
    assert "Figure 1." in text and "The pipeline of this run" in text
    assert "](../figures/tasks.png)" in (RUN / "report/report.md").read_text()  # links resolve from report/


def test_cross_model_and_benchmark_rows(run):
    """A sweep run's manifest records its pair's FCAS / CKA and the benchmark table: the report cites them."""
    import csv

    from mechflow.benchmark.report import COLUMNS
    from mechflow.contracts.stats import CkaDocument, FcasDocument

    pair = Path("results/cross_model/r__vs__s/ioi")
    fcas = write_document(pair / "fcas.json", FcasDocument, {
        "definition": "d", "attribution": "exact", "model_a": "r", "model_b": "s", "n_layers_a": 2, "n_layers_b": 3,
        "labels": "l", "k": 5, "score": 0.4321, "pairs": [], "null_kind": "shuffle_depth", "n_permutations": 99,
        "seed": 0, "p_value": 0.03, "p_value_randomized": 0.04, "z": 2.1, "null_mean": 0.2, "null_std": 0.1,
        "null_quantiles": {}})
    cka = write_document(pair / "cka.json", CkaDocument, {
        "model_a": "r", "model_b": "s", "hook": "resid_post", "position": "last", "n_prompts": 8, "n_prompts_a": 8,
        "n_prompts_b": 8, "n_shared": 8, "prompts": "p", "estimators": "e", "mean_depth_matched_cka": 0.6543,
        "mean_depth_matched_cka_debiased": None, "by_layer_a": [], "mean_shuffled_cka": 0.1234,
        "mean_shuffled_cka_debiased": None, "n_shuffles": 4})
    table = RUN / "benchmark/ioi/table.csv"
    table.parent.mkdir(parents=True)
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerow(["eap_ig", "1.5", "10", "10", "42", "0.81", "0.9", "0.1", "0.97"])
        w.writerow(["acdc", "120", "900", "0", "57", "0.8", "0.85", "0.15", ""])
    outputs = [RUN / "config.resolved.yaml", RUN / "model_card.json", RUN / "tasks/ioi/baseline.json",
               RUN / "tasks/greater_than/baseline.json", fcas, cka, table]
    write_run_manifest({"seed": 0}, resolved_config=RUN / "config.resolved.yaml", inputs=[], outputs=outputs,
                       model_card=RUN / "model_card.json", run_manifest=RUN / "run_manifest.json", run="r")
    _report(ReportConfig.from_dict({"provider_file": None}))
    numbers = {n["id"]: n for n in json.loads((RUN / "report/report.json").read_text())["numbers"]}
    assert numbers["cross_model.r__vs__s.ioi.fcas"]["value"] == 0.4321
    assert numbers["cross_model.r__vs__s.ioi.cka"]["text"] == "0.6543"
    assert numbers["benchmark.ioi.eap_ig.n_edges_in_circuit"]["value"] == 42
    assert numbers["benchmark.ioi.acdc.roc_auc"]["text"] == "n/a"  # ACDC has no edge ranking: empty cell
    md = (RUN / "report/report.md").read_text()
    assert "Cross-model comparisons" in md and "ACDC benchmark" in md
