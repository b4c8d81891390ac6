"""Statistics stage on synthetic circuits-stage files (exact schemas of the contract, no model)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch

from mechflow.circuits.faithfulness import MIB_PERCENTAGES, CurvePoint, area_metrics, normalized_faithfulness
from mechflow.circuits.result import CircuitFile, LogitDiffSpec, PromptSet, write_circuit
from mechflow.contracts.models import ModelCard
from mechflow.errors import ConfigError, DataError
from mechflow.io import atomic_write_json
from mechflow.stats import (
    bootstrap_faithfulness,
    cross_model,
    kendall_tau_b,
    resample_indices,
    stage,
    stats,
)
from mechflow.stats.alignment import cka_prompt_texts, last_token_residuals
from mechflow.stats.cka import cka_by_depth
from mechflow.stats.stage import STATS_OUTPUTS, cross_model_outputs, stats_outputs
from mechflow.tasks.dataset import TaskItem, write_dataset

CFG = {"B": 200, "seed": 3, "top_k": 4, "n_permutations": 199}
OUTPUTS = ["bootstrap.parquet", "bootstrap.csv", "stability.json", "stability_methods.csv", "forest.png",
           "tau_heatmap.png", "statistics.md"]
RULES = Path(__file__).resolve().parents[3] / "workflow" / "rules"


def rule_outputs(smk: Path, rule: str) -> dict[str, str]:
    """Output name -> file name of `rule` in the rule file `smk` (a plain path or `report(path, ...)`)."""
    block = smk.read_text().split(f"rule {rule}:\n", 1)[1].split("\nrule ", 1)[0]
    section = block.split("    output:\n", 1)[1]
    lines = []
    for line in section.splitlines():
        if line.startswith("    ") and not line.startswith("     "):  # the next directive (log:, ...)
            break
        lines.append(line)
    names = re.findall(r'^ {8}(\w+)=(?:report\(\s*)?f?"([^"]+)"', "\n".join(lines), flags=re.M)
    return {name: path.rsplit("/", 1)[1] for name, path in names}


def components(n_layers, n_heads):
    out = []
    for l in range(n_layers):
        out += [(f"a{l}.h{h}", "head", l, h) for h in range(n_heads)]
        out.append((f"m{l}", "mlp", l, -1))
    return out


def node_scores_frame(effects: dict[str, np.ndarray], comps) -> pl.DataFrame:
    """effects: method -> [n_prompts, n_components] per-prompt scores."""
    rows = {"method": [], "component": [], "kind": [], "layer": [], "head": [], "prompt": [], "score": []}
    for m, X in effects.items():
        for j, (c, kind, l, h) in enumerate(comps):
            for i in range(X.shape[0]):
                for key, v in zip(rows, (m, c, kind, l, h, i, X[i, j])):
                    rows[key].append(v)
    return pl.DataFrame(rows, schema={"method": pl.String, "component": pl.String, "kind": pl.String,
                                      "layer": pl.Int32, "head": pl.Int32, "prompt": pl.Int32, "score": pl.Float64})


def write_card(path, n_layers, n_heads, name="synthetic"):
    card = ModelCard(name=name, architecture="LlamaForCausalLM", n_layers=n_layers, n_heads=n_heads, d_model=8,
                     d_mlp=16, d_vocab=10, source="synthetic", dtype="float32", prepend_bos=True)
    atomic_write_json(path, card.model_dump(mode="json"))


def write_circuit_files(d: Path, rng, n: int, example_ids: list[str] | None = None) -> dict:
    """circuit_prompts/curve_prompts and a circuit.json computed the way the circuits stage computes it."""
    example_ids = example_ids if example_ids is not None else [f"ex{i}" for i in range(n)]
    m_full = rng.normal(3.0, 1.0, n)
    m_empty = rng.normal(0.2, 0.5, n)
    m_circuit = m_empty + 0.8 * (m_full - m_empty) + rng.normal(0, 0.3, n)
    m_without = m_empty + 0.3 * (m_full - m_empty) + rng.normal(0, 0.3, n)
    pl.DataFrame({"prompt": np.arange(n, dtype=np.int32), "m_full": m_full, "m_empty": m_empty,
                  "m_circuit": m_circuit, "m_without_circuit": m_without}).write_parquet(d / "circuit_prompts.parquet")
    n_total = 1000
    rows, curve_metric = [], {}
    for pct in MIB_PERCENTAGES:
        frac = min(1.0, (pct / 100) ** 0.3)
        met = m_empty + frac * (m_full - m_empty) + rng.normal(0, 0.2, n)
        curve_metric[pct] = met
        rows.append(pl.DataFrame({"budget_pct": np.full(n, float(pct)), "n_edges": np.full(n, int(pct / 100 * n_total)),
                                  "prompt": np.arange(n, dtype=np.int32), "metric": met}))
    # shuffled row order: the stage must align rows by prompt id, not by position
    pl.concat(rows).sample(fraction=1.0, shuffle=True, seed=0).write_parquet(d / "curve_prompts.parquet")

    def mean(x):  # CircuitEvaluator.metric: float(per_prompt.double().mean())
        return float(torch.tensor(x).double().mean())

    mf, m0, mc = mean(m_full), mean(m_empty), mean(m_circuit)
    suff = normalized_faithfulness(mc, mf, m0)
    comp = 1.0 - normalized_faithfulness(mean(m_without), mf, m0)
    s, c = min(max(suff, 0.0), 1.0), min(max(comp, 0.0), 1.0)
    f1 = 2 * s * c / (s + c) if s + c > 0 else 0.0
    curve = [CurvePoint(pct, int(pct / 100 * n_total), mean(curve_metric[pct]),
                        normalized_faithfulness(mean(curve_metric[pct]), mf, m0)) for pct in MIB_PERCENTAGES]
    areas = area_metrics(curve)
    doc = CircuitFile(
        model={"name": "synthetic"}, n_layers=3, n_heads=2, n_edges_total=n_total, method="eap", config={},
        config_hash="0", target=0.8, edges=[], nodes=[], n_edges=50, m_full=mf, m_empty=m0, m_circuit=mc,
        faithfulness=suff, faithfulness_one_fewer=suff, sufficiency=suff, comprehensiveness=comp, f1=f1,
        curve=[vars(p) for p in curve], cpr=areas["cpr"], cmd=areas["cmd"], n_evaluations=1,
        metric=LogitDiffSpec(correct_ids=[1] * n, incorrect_ids=[2] * n),
        prompts=PromptSet(clean_tokens=[[1]] * n, corrupted_tokens=[[2]] * n, prompt_ids=example_ids))
    write_circuit(d / "circuit.json", doc)
    return {"m_full": m_full, "m_empty": m_empty, "m_circuit": m_circuit, "m_without": m_without,
            "curve": curve_metric, "doc": doc}


def make_inputs(d: Path, *, n=12, n_layers=3, n_heads=2, seed=0, effects=None, templates=None, circuit=True,
                name="synthetic", circuit_ids=None):
    """Write a full set of circuits-stage files into `d`; return the paths and the raw arrays."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    comps = components(n_layers, n_heads)
    p = len(comps)
    if effects is None:
        base = rng.normal(0, 1, p)
        exact = base + rng.normal(0, 0.5, (n, p))
        effects = {"exact": exact, "ap": 0.8 * exact + rng.normal(0, 0.3, (n, p)),
                   "ig": exact + rng.normal(0, 0.1, (n, p))}
    frame = node_scores_frame(effects, comps).sample(fraction=1.0, shuffle=True, seed=1)
    frame.write_parquet(d / "node_scores.parquet")
    templates = templates if templates is not None else ["t0", "t1", "t2"] * (n // 3) + ["t0"] * (n % 3)
    clean = rng.normal(3, 1, n)
    pl.DataFrame({"prompt": np.arange(n, dtype=np.int32), "example_id": [f"ex{i}" for i in range(n)],
                  "template": pl.Series(templates, dtype=pl.String), "clean_metric": clean,
                  "corrupted_metric": rng.normal(0, 1, n)}).write_parquet(d / "prompts.parquet")
    write_card(d / "model_card.json", n_layers, n_heads, name)
    paths = {"node_scores": d / "node_scores.parquet", "prompts": d / "prompts.parquet",
             "model_card": d / "model_card.json"}
    extra = {}
    if circuit:
        extra = write_circuit_files(d, rng, n if circuit_ids is None else len(circuit_ids), circuit_ids)
        paths.update(circuit=d / "circuit.json", circuit_prompts=d / "circuit_prompts.parquet",
                     curve_prompts=d / "curve_prompts.parquet")
    return paths, {"effects": effects, "clean": clean, "comps": comps, **extra}


@pytest.fixture
def inputs(tmp_path):
    return make_inputs(tmp_path / "circuits")


def no_temp_files(d: Path) -> bool:
    return not [p for p in d.iterdir() if p.name.startswith(".")]


def test_every_output_is_written_and_estimates_are_plain_means(inputs, tmp_path):
    paths, raw = inputs
    out = tmp_path / "stats"
    head = stats(CFG, **paths, **stats_outputs(out))
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    assert no_temp_files(out)
    df = pl.read_parquet(out / "bootstrap.parquet")
    assert pl.read_csv(out / "bootstrap.csv").height == df.height == 3 * 9 + 2 + 9
    assert set(df["n_prompts"]) == {12} and set(df["B"]) == {200} and set(df["seed"]) == {3}
    assert set(df["resample_set"]) == {"prompts"}  # one batch: every quantity on the same resamples
    # point estimates: plain means over prompts of each (method, component) score
    means = pl.read_parquet(paths["node_scores"]).group_by("method", "component").agg(pl.col("score").mean())
    got = df.filter(pl.col("group") == "score").join(means, on=["method", "component"])
    assert got.height == 27
    np.testing.assert_allclose(got["estimate"], got["score"], rtol=1e-13, atol=1e-15)
    assert (df.filter(pl.col("quantity") == "task:clean_metric")["estimate"][0]
            == pytest.approx(raw["clean"].mean(), rel=1e-14))
    for m in ("percentile", "bca"):  # every interval contains its estimate
        assert (df[f"{m}_lo"] <= df["estimate"]).all() and (df["estimate"] <= df[f"{m}_hi"]).all()
    assert (df["percentile_hi"] > df["percentile_lo"]).all()
    assert head["n_prompts"] == 12
    assert head["circuit"]["faithfulness"]["estimate"] == pytest.approx(raw["doc"].faithfulness)
    md = (out / "statistics.md").read_text()
    assert "bootstrap.csv" in md and "stability.json" in md and "circuit:cpr" in md


def test_circuit_point_estimates_equal_circuit_json(inputs, tmp_path):
    paths, raw = inputs
    stats(CFG, **paths, **stats_outputs(tmp_path / "stats"))
    df = pl.read_parquet(tmp_path / "stats" / "bootstrap.parquet").filter(pl.col("group") == "circuit")
    doc = raw["doc"]
    names = ["m_full", "m_empty", "m_circuit", "faithfulness", "sufficiency", "comprehensiveness", "f1", "cpr", "cmd"]
    assert df["quantity"].to_list() == [f"circuit:{q}" for q in names]
    for q, est, ref in zip(names, df["estimate"], df["reference"]):
        assert ref == getattr(doc, q)
        assert est == pytest.approx(getattr(doc, q), rel=1e-12, abs=1e-14), q


def test_circuit_intervals_match_independent_bootstraps(inputs, tmp_path):
    """Faithfulness CI = `bootstrap_faithfulness` on the same seed; CPR/CMD CI = brute-force loop."""
    paths, raw = inputs
    stats(CFG, **paths, **stats_outputs(tmp_path / "stats"))
    df = pl.read_parquet(tmp_path / "stats" / "bootstrap.parquet")
    row = {r["quantity"]: r for r in df.iter_rows(named=True)}
    ref = bootstrap_faithfulness(raw["m_circuit"], raw["m_full"], raw["m_empty"], B=200, seed=3)
    assert row["circuit:faithfulness"]["percentile_lo"] == pytest.approx(ref.ci("percentile")[0, 0], rel=1e-12)
    assert row["circuit:faithfulness"]["bca_hi"] == pytest.approx(ref.ci("bca")[0, 1], rel=1e-12)
    idx = resample_indices(12, 200, 3)
    cpr, cmd = [], []
    for rows in idx:
        mf, m0 = raw["m_full"][rows].mean(), raw["m_empty"][rows].mean()
        pts = [CurvePoint(p, 0, raw["curve"][p][rows].mean(),
                          normalized_faithfulness(raw["curve"][p][rows].mean(), mf, m0)) for p in MIB_PERCENTAGES]
        a = area_metrics(pts)
        cpr.append(a["cpr"])
        cmd.append(a["cmd"])
    for name, dist in (("cpr", cpr), ("cmd", cmd)):
        lo, hi = np.quantile(dist, [0.025, 0.975])
        assert row[f"circuit:{name}"]["percentile_lo"] == pytest.approx(lo, rel=1e-10)
        assert row[f"circuit:{name}"]["percentile_hi"] == pytest.approx(hi, rel=1e-10)
        assert row[f"circuit:{name}"]["se"] == pytest.approx(np.std(dist, ddof=1), rel=1e-10)


def test_a_separate_circuit_batch_is_resampled_on_its_own(tmp_path):
    """Circuit stage on other examples than the node scores: its CIs come from its own resamples."""
    ids = ["ex0", "ex1", "ex7", "ex9", "ex10"]
    paths, raw = make_inputs(tmp_path / "c", n=12, circuit_ids=ids)
    head = stats(CFG, **paths, **stats_outputs(tmp_path / "s"))
    df = pl.read_parquet(tmp_path / "s" / "bootstrap.parquet")
    circ = df.filter(pl.col("group") == "circuit")
    assert set(circ["resample_set"]) == {"circuit_prompts"} and set(circ["n_prompts"]) == {5}
    assert set(df.filter(pl.col("group") != "circuit")["n_prompts"]) == {12} and head["circuit_n_prompts"] == 5
    ref = bootstrap_faithfulness(raw["m_circuit"], raw["m_full"], raw["m_empty"], B=200, seed=3)
    row = circ.filter(pl.col("quantity") == "circuit:faithfulness").row(0, named=True)
    assert row["estimate"] == pytest.approx(raw["doc"].faithfulness, rel=1e-12)
    assert (row["bca_lo"], row["bca_hi"]) == pytest.approx(tuple(ref.ci("bca")[0]), rel=1e-12)
    assert "its own batch of 5 prompts" in (tmp_path / "s" / "statistics.md").read_text()


def test_same_seed_gives_identical_files_and_another_seed_does_not(inputs, tmp_path):
    paths, _ = inputs
    stats(CFG, **paths, **stats_outputs(tmp_path / "a"))
    stats(CFG, **paths, **stats_outputs(tmp_path / "b"))
    stats({**CFG, "seed": 4}, **paths, **stats_outputs(tmp_path / "c"))
    for name in ("bootstrap.parquet", "bootstrap.csv", "stability.json", "stability_methods.csv", "statistics.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "bootstrap.csv").read_bytes() != (tmp_path / "c" / "bootstrap.csv").read_bytes()


def test_the_rule_declares_every_file_the_stage_writes():
    assert rule_outputs(RULES / "stats.smk", "stats") == STATS_OUTPUTS
    assert sorted(STATS_OUTPUTS.values()) == sorted(OUTPUTS)
    assert rule_outputs(RULES / "stats.smk", "cross_model") == {
        name: path.name for name, path in cross_model_outputs("x").items()}


def test_writes_exactly_the_named_paths(inputs, tmp_path):
    """Each file goes to the path its keyword names (the rule's output), nothing beside it, with the
    bytes of a run into one folder under the default names."""
    paths, _ = inputs
    named = {name: tmp_path / "named" / name / f"custom_{file}" for name, file in STATS_OUTPUTS.items()}
    head = stats(CFG, **paths, **named)
    stats(CFG, **paths, **stats_outputs(tmp_path / "default"))
    for name, path in named.items():
        assert [p.name for p in path.parent.iterdir()] == [path.name], name
        if path.suffix != ".png":
            assert path.read_bytes() == (tmp_path / "default" / STATS_OUTPUTS[name]).read_bytes(), name
    assert head["outputs"] == {file: str(named[name]) for name, file in STATS_OUTPUTS.items()}


def test_method_stability_on_planted_rankings(tmp_path):
    rng = np.random.default_rng(5)
    n, p = 10, 9
    exact = np.arange(1, p + 1) + rng.normal(0, 0.01, (n, p))
    paths, _ = make_inputs(tmp_path / "c", n=n, circuit=False,
                           effects={"exact": exact, "ap": 2.0 * exact, "ig": -exact})
    stats(CFG, **paths, **stats_outputs(tmp_path / "s"))
    stab = json.loads((tmp_path / "s" / "stability.json").read_text())
    signed, absolute = stab["methods_pairwise"]["signed"], stab["methods_pairwise"]["abs"]
    assert signed["names"] == ["exact", "ap", "ig"]
    assert signed["tau_b"][0][1] == pytest.approx(1.0) and signed["tau_b"][0][2] == pytest.approx(-1.0)
    assert absolute["tau_b"][0][2] == pytest.approx(1.0) and absolute["jaccard_top_k"][0][2] == 1.0
    assert signed["jaccard_top_k"][0][2] == 0.0  # top-4 largest vs top-4 smallest of 9: disjoint
    csv = pl.read_csv(tmp_path / "s" / "stability_methods.csv")
    assert csv.height == 6 and set(csv["ranking"]) == {"signed", "abs"}
    # means 1..9 with noise 0.01: every resample keeps the ranking exactly
    assert stab["bootstrap"]["exact"]["signed"]["tau_summary"]["mean"] == pytest.approx(1.0)
    assert "skipped" not in stab["templates"]


def test_template_stability_on_planted_templates(tmp_path):
    rng = np.random.default_rng(6)
    p = 9
    v = np.arange(1, p + 1, dtype=float)
    templates = ["A"] * 4 + ["B"] * 4 + ["C"] * 3 + ["D"]  # D has one prompt: left out
    eff = np.stack([v if t in ("A", "C") else (v[::-1] if t == "B" else rng.normal(size=p)) for t in templates])
    exact = eff + rng.normal(0, 0.01, eff.shape)
    paths, _ = make_inputs(tmp_path / "c", n=12, circuit=False, templates=templates,
                           effects={"exact": exact, "ap": exact + rng.normal(0, 0.01, eff.shape)})
    stats(CFG, **paths, **stats_outputs(tmp_path / "s"))
    tp = json.loads((tmp_path / "s" / "stability.json").read_text())["templates"]
    assert tp["templates"] == ["A", "B", "C"] and tp["n_prompts_per_template"]["D"] == 1
    tau = np.array(tp["by_method"]["exact"]["signed"]["tau_b"])
    assert tau[0, 1] == pytest.approx(-1.0) and tau[0, 2] == pytest.approx(1.0) and tau[1, 2] == pytest.approx(-1.0)
    # reference: tau-b of the per-template mean rankings computed directly
    assert tau[0, 1] == pytest.approx(kendall_tau_b(exact[:4].mean(0), exact[4:8].mean(0)))


def test_template_stability_is_skipped_with_a_note(tmp_path):
    paths, _ = make_inputs(tmp_path / "c", n=6, circuit=False, templates=[None] * 6)
    stats(CFG, **paths, **stats_outputs(tmp_path / "s"))
    tp = json.loads((tmp_path / "s" / "stability.json").read_text())["templates"]
    assert "skipped" in tp and "by_method" not in tp
    assert "Across templates: skipped" in (tmp_path / "s" / "statistics.md").read_text()


def test_single_method_without_circuit(tmp_path):
    rng = np.random.default_rng(7)
    paths, _ = make_inputs(tmp_path / "c", n=5, circuit=False, effects={"exact": rng.normal(size=(5, 9))})
    head = stats(CFG, **paths, **stats_outputs(tmp_path / "s"))
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(OUTPUTS)
    assert head["circuit"] == {}
    assert "skipped" in json.loads((tmp_path / "s" / "stability.json").read_text())["methods_pairwise"]


def _rewrite(path: Path, fn):
    fn(pl.read_parquet(path)).write_parquet(path)


@pytest.mark.parametrize("case,file,needle", [
    ("missing_score", "node_scores.parquet", "'score'"),
    ("string_layer", "node_scores.parquet", "'layer'"),
    ("missing_row", "node_scores.parquet", "one row per (method, component, prompt)"),
    ("bad_component", "node_scores.parquet", "'component'"),
    ("nan_clean", "prompts.parquet", "'clean_metric'"),
    ("one_prompt", "prompts.parquet", "at least 2"),
    ("circuit_prompt_ids", "circuit_prompts.parquet", "'prompt'"),
    ("curve_prompt_ids", "curve_prompts.parquet", "'prompt'"),
    ("curve_float_edges", "curve_prompts.parquet", "'n_edges'"),
    ("json_mismatch", "circuit.json", "faithfulness"),
    ("layer_vs_card", "node_scores.parquet", "'layer'"),
])
def test_bad_inputs_raise_one_data_error_and_write_nothing(tmp_path, case, file, needle):
    paths, _ = make_inputs(tmp_path / "c", n=6)
    d = tmp_path / "c"
    if case == "missing_score":
        _rewrite(d / file, lambda df: df.drop("score"))
    elif case == "string_layer":
        _rewrite(d / file, lambda df: df.with_columns(pl.col("layer").cast(pl.String)))
    elif case == "missing_row":
        _rewrite(d / file, lambda df: df.slice(1))
    elif case == "bad_component":
        _rewrite(d / file, lambda df: df.with_columns(pl.col("component").str.replace("m2", "mlp2")))
    elif case == "nan_clean":
        _rewrite(d / file, lambda df: df.with_columns(pl.lit(float("nan")).alias("clean_metric")))
    elif case == "one_prompt":
        _rewrite(d / file, lambda df: df.head(1))
        _rewrite(d / "node_scores.parquet", lambda df: df.filter(pl.col("prompt") == 0))
    elif case == "circuit_prompt_ids":
        _rewrite(d / file, lambda df: df.with_columns(pl.col("prompt") + 10))
    elif case == "curve_prompt_ids":
        _rewrite(d / file, lambda df: df.filter(pl.col("prompt") != 2))
    elif case == "curve_float_edges":
        _rewrite(d / file, lambda df: df.with_columns(pl.col("n_edges").cast(pl.Float64)))
    elif case == "json_mismatch":
        doc = json.loads((d / file).read_text())
        doc["faithfulness"] += 0.01
        doc["sufficiency"] += 0.01
        (d / file).write_text(json.dumps(doc))
    elif case == "layer_vs_card":
        write_card(d / "model_card.json", 2, 2)
    out = tmp_path / "s"
    with pytest.raises(DataError, match=r".*") as exc:
        stats(CFG, **paths, **stats_outputs(out))
    assert file in str(exc.value) and needle in str(exc.value)
    assert not out.exists()


def test_top_k_larger_than_components_is_a_config_error(inputs, tmp_path):
    paths, _ = inputs
    with pytest.raises(ConfigError, match="stats.top_k"):
        stats({**CFG, "top_k": 100}, **paths, **stats_outputs(tmp_path / "s"))


# ----------------------------------------------------------------------------- cross-model


def _cross(tmp_path, a, b, **kw):
    return cross_model(CFG, node_scores_a=a["node_scores"], node_scores_b=b["node_scores"],
                           model_card_a=a["model_card"], model_card_b=b["model_card"],
                           prompts_a=a["prompts"], prompts_b=b["prompts"],
                           **cross_model_outputs(tmp_path / "x", cka="model_cfg_a" in kw), **kw)


def _head_types(path: Path, comps, labels):
    heads = [c for c in comps if c[1] == "head"]
    pl.DataFrame({"component": [c[0] for c in heads], "layer": pl.Series([c[2] for c in heads], dtype=pl.Int32),
                  "head": pl.Series([c[3] for c in heads], dtype=pl.Int32),
                  "label": [labels[i % len(labels)] for i in range(len(heads))]}).write_parquet(path)
    return path


def test_cross_model_identical_circuits_align_perfectly(tmp_path):
    a, raw = make_inputs(tmp_path / "A", n=8, n_layers=6, n_heads=3, seed=1, circuit=False, name="model_a")
    b, _ = make_inputs(tmp_path / "B", n=8, n_layers=6, n_heads=3, seed=1, circuit=False, name="model_b")
    labels = ["induction", "name_mover", "previous_token", "other"]
    ht_a = _head_types(tmp_path / "A" / "head_types.parquet", raw["comps"], labels)
    ht_b = _head_types(tmp_path / "B" / "head_types.parquet", raw["comps"], labels)
    head = _cross(tmp_path, a, b, head_types_a=ht_a, head_types_b=ht_b)
    out = tmp_path / "x"
    assert sorted(p.name for p in out.iterdir()) == ["cross_model.md", "fcas.json", "fcas_null.png"]
    doc = json.loads((out / "fcas.json").read_text())
    assert doc["score"] == pytest.approx(1.0) and head["fcas"] == doc["score"]
    assert doc["labels"] == "head_types" and doc["n_permutations"] == 199 and doc["k"] == 4
    assert all(p["a"]["component"] == p["b"]["component"] for p in doc["pairs"])
    # the top-4 by |mean exact score| of model A, as the pairs
    means = raw["effects"]["exact"].mean(0)
    comp_names = [c[0] for c in raw["comps"]]
    top = {comp_names[i] for i in np.argsort(-np.abs(means))[:4]}
    assert {p["a"]["component"] for p in doc["pairs"]} == top
    assert doc["p_value"] < 0.05 and 0 < doc["p_value_randomized"] <= doc["p_value"]
    assert set(doc["null_quantiles"]) == {"q0.05", "q0.25", "q0.5", "q0.75", "q0.95"}
    assert "fcas.json" in (out / "cross_model.md").read_text()


def test_cross_model_labels_fall_back_to_coarse_when_one_side_lacks_head_types(tmp_path):
    a, raw = make_inputs(tmp_path / "A", n=4, n_layers=4, seed=2, circuit=False, name="model_a")
    b, _ = make_inputs(tmp_path / "B", n=5, n_layers=3, seed=3, circuit=False, name="model_b")
    ht_a = _head_types(tmp_path / "A" / "head_types.parquet", raw["comps"], ["induction"])
    _cross(tmp_path, a, b, head_types_a=ht_a, head_types_b=tmp_path / "B" / "absent.parquet")
    doc = json.loads((tmp_path / "x" / "fcas.json").read_text())
    assert doc["labels"].startswith("coarse") and "model_b" in doc["labels"]
    assert {p["a"]["label"] for p in doc["pairs"]} <= {"head", "mlp"}


def test_cross_model_needs_exact_scores(tmp_path):
    rng = np.random.default_rng(0)
    a, _ = make_inputs(tmp_path / "A", n=4, circuit=False, effects={"ap": rng.normal(size=(4, 9))})
    with pytest.raises(DataError, match="'exact'"):
        _cross(tmp_path, a, a, head_types_a=None, head_types_b=None)


def test_cka_without_its_paths_is_a_config_error_before_any_work(tmp_path):
    a, _ = make_inputs(tmp_path / "A", n=4, circuit=False, name="model_a")
    with pytest.raises(ConfigError, match=r"no path for \['cka_table', 'cka_csv', 'cka_figure'\]"):
        cross_model(CFG, node_scores_a=a["node_scores"], node_scores_b=a["node_scores"],
                        model_card_a=a["model_card"], model_card_b=a["model_card"], head_types_a=None,
                        head_types_b=None, prompts_a=a["prompts"], prompts_b=a["prompts"],
                        **cross_model_outputs(tmp_path / "x", cka=False), cka=tmp_path / "x" / "cka.json",
                        model_cfg_a={"name": "x"}, model_cfg_b={"name": "y"})
    assert not (tmp_path / "x").exists()


def test_cross_model_with_cka_writes_exactly_the_named_paths(tmp_path, monkeypatch):
    """With CKA (activations stubbed: no model is loaded), every file goes to the path its keyword
    names and nothing beside it, with the bytes of a run into one folder under the default names."""
    a, _ = make_inputs(tmp_path / "A", n=8, n_layers=4, seed=2, circuit=False, name="model_a")
    b, _ = make_inputs(tmp_path / "B", n=8, n_layers=3, seed=3, circuit=False, name="model_b")
    da = _dataset(tmp_path / "A" / "dataset.jsonl", [f"p{i}" for i in range(9)], "model_a")
    db = _dataset(tmp_path / "B" / "dataset.jsonl", [f"p{i}" for i in range(4, 12)], "model_b")
    rng = np.random.default_rng(0)
    acts_a, acts_b = [rng.normal(size=(12, 5)) for _ in range(4)], [rng.normal(size=(12, 6)) for _ in range(3)]

    def fake_cka(model_cfg_a, model_cfg_b, card_a, card_b, dataset_a, dataset_b, texts):
        assert len(texts) == 12
        return cka_by_depth(acts_a, acts_b, n_layers_a=card_a.n_layers, n_layers_b=card_b.n_layers, n_shuffles=20)

    monkeypatch.setattr(stage, "representation_cka", fake_cka)
    common = dict(node_scores_a=a["node_scores"], node_scores_b=b["node_scores"], model_card_a=a["model_card"],
                  model_card_b=b["model_card"], head_types_a=None, head_types_b=None, prompts_a=a["prompts"],
                  prompts_b=b["prompts"], dataset_a=da, dataset_b=db, model_cfg_a={"name": "x"},
                  model_cfg_b={"name": "y"})
    default = cross_model_outputs(tmp_path / "default")
    named = {name: tmp_path / "named" / name / f"custom_{path.name}" for name, path in default.items()}
    head = cross_model(CFG, **common, **named)
    cross_model(CFG, **common, **default)
    assert sorted(p.name for p in (tmp_path / "default").iterdir()) == sorted(
        ["fcas.json", "fcas_null.png", "cross_model.md", "cka.json", "cka.parquet", "cka.csv", "cka.png"])
    for name, path in named.items():
        assert [p.name for p in path.parent.iterdir()] == [path.name], name
        if path.suffix != ".png":
            assert path.read_bytes() == default[name].read_bytes(), name
    assert head["cka"]["n_prompts"] == 12
    assert sorted(head["outputs"].values()) == sorted(str(p) for p in named.values())


def _dataset(path: Path, prompts: list[str], model: str) -> Path:
    items = [TaskItem(id=i, prompt=t, corrupted_prompt=t + "!", answer=" a", wrong_answer=" b", template=None,
                      clean_ids=[1, 2 + i % 3], corrupted_ids=[1, 3], answer_id=4, wrong_id=5, good_ids=[4],
                      bad_ids=[5]) for i, t in enumerate(prompts)]
    write_dataset(path, items, {"task": "t", "kind": "jsonl", "metric": "logit_diff", "tokenizer": {"model": model}})
    return path


def test_cka_prompts_are_the_union_of_both_datasets_and_need_eight(tmp_path):
    da = _dataset(tmp_path / "a" / "dataset.jsonl", [f"p{i}" for i in range(6)] + ["p0"], "model_a")
    db = _dataset(tmp_path / "b" / "dataset.jsonl", [f"p{i}" for i in range(3, 9)], "model_b")
    got = cka_prompt_texts(da, db)
    assert got.texts == [f"p{i}" for i in range(9)] and (got.n_a, got.n_b, got.n_shared) == (6, 6, 3)
    dc = _dataset(tmp_path / "c" / "dataset.jsonl", [f"p{i}" for i in range(7)], "model_b")
    with pytest.raises(DataError, match="hold 7 distinct prompt"):
        cka_prompt_texts(da, dc)
    # through the stage: fails before any model is loaded, and writes nothing
    a, _ = make_inputs(tmp_path / "A", n=4, circuit=False, name="model_a")
    with pytest.raises(DataError, match="CKA needs at least 8"):
        _cross(tmp_path, a, a, head_types_a=None, head_types_b=None, dataset_a=da, dataset_b=dc,
               model_cfg_a={"name": "x"}, model_cfg_b={"name": "y"})
    assert not (tmp_path / "x").exists()


def test_last_token_residuals_match_run_with_cache(tiny_llama):
    seqs = [[1, 2, 3], [4, 5], [6, 7, 8], [9, 10, 11, 12], [3, 3]]
    got = last_token_residuals(SimpleNamespace(model=tiny_llama), seqs, batch_size=1)
    for i, s in enumerate(seqs):
        _, cache = tiny_llama.run_with_cache(torch.tensor([s]))
        for l in range(tiny_llama.cfg.n_layers):
            np.testing.assert_allclose(got[l][i], cache[f"blocks.{l}.hook_resid_post"][0, -1].numpy(), rtol=1e-12)
