"""The Snakemake DAG: dry-run plan, sweeps, config errors, lint, DAG drawing, a smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
SPINE_RULES = {"resolve_config", "model_card", "prepare_task", "evaluate_task", "prepare_corpus", "harvest",
               "summarize", "run_manifest", "all", "attribute", "circuits", "stats", "train_sae",
               "evaluate_sae", "train_transcoder", "evaluate_transcoder"}


def snakemake(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*SNAKEMAKE, "--directory", str(cwd), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def planned_rules(stdout: str) -> dict[str, int]:
    """Parse the job-stats table of a dry run: rule name -> job count."""
    counts, in_table = {}, False
    for line in stdout.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            in_table = True
            continue
        if in_table and len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
        elif in_table and parts and parts[0] == "total":
            break
    return counts


def test_dry_run_plans_every_stage(tmp_path):
    result = snakemake("-n", "--cores", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = planned_rules(result.stdout)
    assert SPINE_RULES <= set(counts), counts
    assert counts["prepare_task"] == counts["evaluate_task"] == counts["attribute"] == counts["circuits"] == 3
    assert counts["stats"] == 3 and counts["train_sae"] == counts["train_transcoder"] == 1
    assert counts["analyze"] == 3 and counts["causal_trace"] == 1  # causal tracing: factual recall only
    assert counts["edge_reference"] == counts["reference"] == 3  # reference.tasks: null = every task
    assert counts["features"] == 1
    assert not (tmp_path / "results").exists()  # a dry run writes no results


def test_cross_layer_transcoder_is_trained_and_evaluated(tmp_path):
    hooks = ",".join(f"blocks.{l}.ln2.hook_normalized,blocks.{l}.hook_mlp_out" for l in range(12, 16))
    result = snakemake("-n", "--cores", "2", "--config",
                       f'overrides=["transcoder=clt","harvest.hooks=[{hooks}]"]', cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = planned_rules(result.stdout)
    assert counts["train_transcoder"] == counts["evaluate_transcoder"] == 1
    assert "results/smollm2_135m/dictionaries/transcoder_metrics.json" in result.stdout


def test_sweep_plans_one_run_folder_per_point(tmp_path):
    result = snakemake("-n", "--cores", "2", "--config", "overrides=model=smollm2_135m,gemma3_270m", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "results/smollm2_135m/run_manifest.json" in result.stdout
    assert "results/gemma3_270m/run_manifest.json" in result.stdout
    counts = planned_rules(result.stdout)
    assert counts["harvest"] == 2 and counts["cross_model"] == 3  # one comparison per shared task
    assert counts["circuits"] == 6  # edge circuits on SmolLM2, node circuits on Gemma-3 (post-norms)
    assert counts["feature_matching"] == 1  # one SAE feature matching per model pair
    assert "results/cross_model/gemma3_270m__vs__smollm2_135m/ioi/fcas.json" in result.stdout


def test_bad_override_fails_with_one_clear_message(tmp_path):
    result = snakemake("-n", "--cores", "1", "--config", "overrides=threads=0", cwd=tmp_path)
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "threads: 0 is less than the minimum of 1" in text and "override" in text


def test_lint_is_clean(tmp_path):
    result = snakemake("--lint", cwd=tmp_path)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    assert "Lints for rule" not in text and "Lints for snakefile" not in text, text[-3000:]


def test_dag_draws_as_mermaid(tmp_path):
    result = snakemake("--dag", "mermaid-js", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "flowchart" in result.stdout and "harvest" in result.stdout


SMOKE = "overrides=+experiment=smoke task=[ioi,greater_than]"  # two metric kinds, less CI time
SMOKE_KEY_ENV, SMOKE_KEY = "MECHFLOW_SMOKE_AUDIT_KEY", "sk-smoke-audit-key-never-written-9f3a"


class Smoke(NamedTuple):
    folder: Path
    overrides: str  # the --config value every later call of the same run passes again


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, smollm2) -> Smoke:
    """The whole default DAG on SmolLM2 with the smoke experiment's tiny sizes (once per module), with
    the black-box audit of SmolLM2 served by mechflow's OpenAI-compatible server on loopback."""
    from mechflow.audit.serve import create_app, serve_in_thread

    folder = tmp_path_factory.mktemp("smoke")
    app = create_app(smollm2, model_name="smollm2_135m", api_key=SMOKE_KEY)
    os.environ[SMOKE_KEY_ENV] = SMOKE_KEY  # the audit job reads it; it must appear in no file
    try:
        with serve_in_thread(app) as base_url:
            overrides = (f"{SMOKE} audit.enabled=true audit.base_url={base_url} audit.api_key_env={SMOKE_KEY_ENV}")
            # a hang guard, not a speed test: 30 min was reached while other jobs shared the 2 cores
            result = snakemake("--cores", "2", "--config", overrides, cwd=folder, timeout=2700)
            assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
            yield Smoke(folder, overrides)
    finally:
        os.environ.pop(SMOKE_KEY_ENV, None)


@pytest.mark.slow
def test_smoke_run_end_to_end(smoke_run):
    tmp_path, overrides = smoke_run
    run = tmp_path / "results" / "smollm2_135m"
    manifest = json.loads((run / "run_manifest.json").read_text())
    assert manifest["model"]["name"] == "smollm2_135m" and len(manifest["config_hash"]) == 16
    assert all(len(h) == 64 for h in manifest["inputs"].values())
    assert (run / "config.resolved.yaml").read_text().startswith("# mechflow")
    assert (run / "summary" / "activation_norms.png").stat().st_size > 1000
    table = (run / "summary" / "summary.csv").read_text()
    assert "ioi" in table and "harvest" in table
    index = json.loads((run / "harvest" / "index.json").read_text())
    assert index["hooks"] and all((run / "harvest" / h["manifest"]).exists() for h in index["hooks"])
    for task in ("ioi", "greater_than"):
        assert (run / "stats" / task / "bootstrap.parquet").exists()
        assert (run / "stats" / task / "statistics.md").exists()
        for name in ("node_scores.parquet", "head_types.parquet"):
            assert (run / "attribution" / task / name).exists(), name
        folder = run / "circuits" / task
        for name in ("circuit.json", "circuit.png", "circuit.dot", "circuit_prompts.parquet", "curve_prompts.parquet",
                     "edge_scores.parquet"):
            assert (folder / name).exists(), folder / name
    # circuit.json alone is enough to recompute faithfulness with independent code
    from mechflow.circuits.result import read_circuit, reevaluate_circuit

    circuit = read_circuit(run / "circuits" / "ioi" / "circuit.json")
    again_f = reevaluate_circuit(circuit)
    assert abs(again_f["faithfulness"] - circuit.faithfulness) < 1e-4
    for name in ("sae_metrics.json", "transcoder_metrics.json"):
        metrics = json.loads((run / "dictionaries" / name).read_text())
        assert metrics["l0"] > 0 and metrics["ce_clean"] > 0
    for task in ("ioi", "greater_than"):
        for name in ("ablations.parquet", "saliency.parquet", "neurons.parquet", "analysis.md"):
            assert (run / "attribution" / task / name).exists(), name
    auc = json.loads((run / "reference" / "ioi" / "auc.json").read_text())
    assert "nodes" in auc and "edges" in auc
    features = (run / "features" / "features.jsonl").read_text().splitlines()
    assert features and json.loads(features[0])["top_contexts"] is not None
    produced = set(manifest["outputs"])
    assert any(p.endswith("reference/ioi/auc.json") for p in produced)
    assert any(p.endswith("/features/features.jsonl") for p in produced)
    assert any(p.endswith("attribution/ioi/ablations.parquet") for p in produced)
    # the smoke experiment builds one IOI attribution graph on a 30-layer transcoder set
    tset = json.loads((run / "dictionaries" / "transcoder_set" / "set.json").read_text())
    assert tset["layers"] == list(range(30)) and len(tset["per_layer"]) == 30
    assert (run / "dictionaries" / "transcoder_set" / "circuit_tracer" / "config.yaml").exists()
    assert not (run / "harvest_layers").exists() or not any((run / "harvest_layers").iterdir())  # temp() shards gone
    tfeat = json.loads((run / "dictionaries" / "transcoder_set" / "features" / "summary.json").read_text())
    assert tfeat["n_layers"] == 30 and tfeat["n_tokens"] > 0 and tfeat["n_records"] > 0
    graph = json.loads((run / "graphs" / "ioi" / "p0" / "graph.json").read_text())
    assert graph["n_feature_nodes"] > 0 and 0 <= graph["scores"]["completeness"] <= 1
    assert graph["validation"]["frozen_max_abs_error"] < 1e-3
    frontend = json.loads((run / "graphs" / "ioi" / "ioi-p0.json").read_text())
    assert frontend["nodes"] and frontend["metadata"]["slug"] == "ioi-p0"
    assert "ioi-p0" in (run / "graphs" / "ioi" / "graphs.md").read_text()
    assert (run / "graphs" / "ioi" / "p0" / "viewer.html").stat().st_size > 5000
    # issue 18: the steer stage's sweep, controls and records for the smoke experiment's task
    steer = json.loads((run / "steer" / "ioi" / "summary.json").read_text())
    assert steer["chosen_layer"] in (1, 2, 3) and steer["n_records"] > 0 and steer["controls"] is not None
    records = [json.loads(line) for line in (run / "steer" / "ioi" / "interventions.jsonl").read_text().splitlines()]
    assert {r["intervention"]["kind"] for r in records} >= {"contrast", "random", "shuffled", "sae_feature"}
    assert any(p.endswith("steer/ioi/interventions.jsonl") for p in produced)
    # issue 19: the black-box audit through the real HTTP client and server; the white-box task through the
    # API gives the white-box run's logit differences; the planted key is in no file
    summary = json.loads((run / "audit" / "summary.json").read_text())
    ioi = next(w for w in summary["whitebox"] if w["task"] == "ioi")
    assert ioi["same_model"] and ioi["agreement"] == 1.0 and ioi["max_abs_score_diff"] < 1e-3
    assert {p["kind"] for p in summary["probes"]} == {"decision", "paraphrase", "refusal"}
    assert summary["probes"][0]["decision"]["score_gap"]["p_value"] is not None
    assert any(p.endswith("audit/responses.jsonl") for p in produced)
    assert not (run / "audit" / "store").exists() or not any((run / "audit" / "store").iterdir())
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and SMOKE_KEY.encode() in p.read_bytes()]
    assert leaked == []
    # a second invocation has nothing to do; nor has `snakemake figures` (the run drew them for its report)
    again = snakemake("-n", "--cores", "2", "--config", overrides, cwd=tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr
    figures = snakemake("-n", "figures", "--cores", "2", "--config", overrides, cwd=tmp_path)  # target first:
    # --config takes every word after it
    assert "Nothing to be done" in figures.stdout + figures.stderr


@pytest.mark.slow
def test_smoke_run_report(smoke_run, poppler):
    """The run ends with report.pdf / .json / .md: the JSON validates against its schema, every number
    names a file the run manifest records and whose sha256 is re-hashed here, the PDF's text holds every
    section heading and every number, and the paper figures and tables exist."""
    import re

    import jsonschema

    from mechflow.io import sha256_file

    smoke_run = smoke_run.folder
    run = smoke_run / "results" / "smollm2_135m"
    doc = json.loads((run / "report" / "report.json").read_text())
    jsonschema.validate(doc, json.loads((REPO / "workflow/schemas/contracts/report.schema.json").read_text()))
    manifest = json.loads((run / "run_manifest.json").read_text())
    recorded = {**manifest["inputs"], **manifest["outputs"]}
    evidence = {e["id"]: e for e in doc["evidence"]}
    for e in doc["evidence"]:
        assert sha256_file(smoke_run / e["path"]) == e["sha256"], e["path"]
        assert e["in_manifest"] == (e["path"] in recorded or e["path"].endswith("run_manifest.json")), e["path"]
    for n in doc["numbers"]:
        assert evidence[n["evidence"]]["in_manifest"], n["id"]
    ids = {n["id"] for n in doc["numbers"]}
    for task in ("ioi", "greater_than"):  # what every stage measured is in it
        assert {f"tasks.{task}.accuracy", f"circuits.{task}.faithfulness", f"circuits.{task}.faithfulness_ci.lo",
                f"stats.{task}.clean_metric.estimate"} <= ids
        assert any(i.startswith(f"reference.{task}.nodes.") for i in ids)
    assert {"dictionaries.sae.fvu", "dictionaries.transcoder.l0", "dictionaries.set.fvu",
            "graphs.ioi.p0.completeness", "model.sha256", "run.config_hash", "audit.whitebox.ioi.api_accuracy",
            "audit.loan_gender_origin.score_gap.p_value", "audit.responses_sha256"} <= ids
    assert doc["completeness"]["to_be_completed"] == doc["completeness"]["total"]  # the shipped template is empty
    for lim in doc["limitations"]:
        assert lim["threshold_key"] and lim["number"] in ids
    text = subprocess.run([str(poppler / "pdftotext"), str(run / "report" / "report.pdf"), "-"], capture_output=True,
                          text=True, check=True).stdout
    flat = re.sub(r"\s+", "", text)
    for section in doc["sections"]:
        assert re.sub(r"\s+", "", section["heading"]) in flat, section["heading"]
    for n in doc["numbers"]:
        assert re.sub(r"\s+", "", n["text"]) in flat, (n["id"], n["text"])
    assert len(doc["figures"]) >= 4  # the paper figures, embedded
    md = (run / "report" / "report.md").read_text()
    assert all(n["text"] in md for n in doc["numbers"])
    from mechflow.report.figures import FIGURES, TABLES

    for name in FIGURES:
        assert (run / "figures" / f"{name}.png").stat().st_size > 5000
        assert (run / "figures" / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    for name in TABLES:
        assert (run / "tables" / f"{name}.csv").exists() and "\\begin{tabular}" in (
            run / "tables" / f"{name}.tex").read_text()


@pytest.mark.slow
def test_snakemake_report_bundles_every_figure(smoke_run):
    """`snakemake --report` of the smoke run holds every PNG the run wrote (each a report() output with
    a caption) and the Annex IV report.pdf."""
    import collections
    import zipfile

    smoke_run, overrides = smoke_run
    out = smoke_run / "snakemake_report.zip"
    result = snakemake("--cores", "1", "--config", overrides, "--report", str(out), cwd=smoke_run)
    assert result.returncode == 0, result.stderr[-3000:]
    inside = collections.Counter(Path(n).name for n in zipfile.ZipFile(out).namelist())
    written = collections.Counter(p.name for p in (smoke_run / "results").rglob("*.png"))
    assert written and all(inside[name] >= count for name, count in written.items()), (written, inside)
    assert inside["report.pdf"] == 1


def test_benchmark_rule_is_opt_in(tmp_path):
    off = planned_rules(snakemake("-n", "--cores", "2", cwd=tmp_path).stdout)
    on = snakemake("-n", "--cores", "2", "--config", "overrides=benchmark.enabled=true", cwd=tmp_path)
    assert "benchmark" not in off
    assert on.returncode == 0 and planned_rules(on.stdout)["benchmark"] == 2, on.stderr[-2000:]  # ioi, greater_than


def test_graph_rules_are_opt_in_and_plan_one_job_per_layer(tmp_path):
    off = planned_rules(snakemake("-n", "--cores", "2", cwd=tmp_path).stdout)
    on = snakemake("-n", "--cores", "2", "--config", "overrides=graph.enabled=true", cwd=tmp_path)
    assert not {"attribution_graph", "train_layer_transcoder", "harvest_layers", "transcoder_features"} & set(off)
    assert on.returncode == 0, on.stderr[-2000:]
    counts = planned_rules(on.stdout)
    assert counts["train_layer_transcoder"] == 30 and counts["harvest_layers"] == 6  # 5 layers per harvest group
    assert counts["transcoder_set"] == 1 and counts["attribution_graph"] == 4 and counts["graphs_summary"] == 2
    assert counts["transcoder_features"] == 1  # the viewer's top contexts, for every graph


@pytest.mark.parametrize("scenario", ["default", "sweep_benchmark"])
def test_dry_run_plans_the_recorded_job_set(scenario, tmp_path):
    """The DAG plans exactly the jobs (rule, inputs, outputs) recorded before the architecture step,
    up to the renames CHANGELOG.md lists."""
    from planned_jobs import DATA, NEW_RULES, SCENARIOS, dry_run_jobs, renamed

    expected = renamed(json.loads((DATA / f"planned_jobs_{scenario}.json").read_text()))
    planned = dry_run_jobs(SCENARIOS[scenario], tmp_path)
    reports = [j for j in planned if j["rule"] == "report"]  # one per run, reading its manifest
    manifests = sorted(i for j in expected if j["rule"] == "run_manifest" for i in j["output"])
    assert sorted(i for j in reports for i in j["input"] if i.endswith("run_manifest.json")) == manifests
    planned = [j for j in planned if j["rule"] not in NEW_RULES]
    missing = [j for j in expected if j not in planned]
    extra = [j for j in planned if j not in expected]
    assert not missing and not extra, f"missing jobs: {missing[:3]}\nnew jobs: {extra[:3]}"
    # every JSON / JSONL / Parquet file a planned job writes has its contract in mechflow.contracts
    assert uncontracted_outputs(planned) == set()


def uncontracted_outputs(jobs: list[dict]) -> set[tuple[str, str]]:
    """(rule, path) of each planned .json/.jsonl/.parquet output that no catalog contract's file
    pattern (``reference/{task}/auc.json``, relative to the run folder) matches."""
    import re

    from mechflow.contracts import catalog

    def pattern(file: str) -> re.Pattern:
        file = file.removesuffix(" (one per line)")
        return re.compile("(^|/)" + re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(file)) + "$")

    patterns = [pattern(c.file) for c in (*catalog.DOCUMENTS, *catalog.TABLES)]
    return {(job["rule"], out) for job in jobs for out in job["output"]
            if out.endswith((".json", ".jsonl", ".parquet")) and not any(p.search(out) for p in patterns)}


def test_the_contract_coverage_check_sees_a_missing_contract():
    jobs = [{"rule": "stats", "output": ["results/r/stats/ioi/stability.json", "results/r/stats/ioi/new_table.parquet",
                                         "results/r/stats/ioi/figure.png"]}]
    assert uncontracted_outputs(jobs) == {("stats", "results/r/stats/ioi/new_table.parquet")}
