"""The circuit rule's files for an edge circuit (tiny llama) and a node circuit (tiny Gemma-3)."""

from __future__ import annotations

import polars as pl
import pyarrow.parquet as pq
import pytest
from circuit_fixtures import make_tiny_gemma, pairs, spec

from mechflow.circuits.config import CircuitConfig
from mechflow.circuits.core import discover_circuit
from mechflow.circuits.result import read_circuit
from mechflow.circuits.stage import write_circuit_outputs

NAMES = ("circuit.json", "edge_scores.parquet", "circuit_prompts.parquet", "curve_prompts.parquet",
         "circuit.dot", "circuit.png", "circuit.md")


def write_all(model, tmp_path, unit: str, n: int = 4):
    b = pairs(11, n=n)
    cfg = CircuitConfig(unit=unit, ig_steps=2, target=0.7, percentages=(10, 20, 50, 100))
    doc, scores = discover_circuit(model, b, cfg, model_cfg={"name": "tiny"}, metric_spec=spec(n),
                                   prompt_ids=[f"ex{i}" for i in range(n)])
    paths = {name.replace(".", "_"): tmp_path / name for name in NAMES}
    write_circuit_outputs(model, b, cfg, doc, scores, circuit=paths["circuit_json"],
                          edge_scores=paths["edge_scores_parquet"], circuit_prompts=paths["circuit_prompts_parquet"],
                          curve_prompts=paths["curve_prompts_parquet"], dot=paths["circuit_dot"],
                          figure=paths["circuit_png"], summary=paths["circuit_md"])
    return doc, paths


@pytest.mark.parametrize("unit", ["edges", "nodes"])
def test_outputs_of_both_units(tiny_llama, tmp_path, unit):
    model = tiny_llama if unit == "edges" else make_tiny_gemma(seed=4)
    doc, paths = write_all(model, tmp_path, unit)
    assert all(p.exists() for p in paths.values())
    back = read_circuit(paths["circuit_json"])
    assert back.unit == unit
    table = pl.read_parquet(paths["edge_scores_parquet"])
    meta = pq.read_schema(paths["edge_scores_parquet"]).metadata
    assert meta[b"mechflow.unit"] == unit.encode()
    assert table["in_circuit"].sum() == doc.n_units and table["rank"].to_list() == list(range(1, table.height + 1))
    if unit == "edges":
        assert {"edge", "sender", "receiver"} <= set(table.columns) and table.height == doc.n_units_total
    else:
        assert "edge" not in table.columns and table.height == doc.n_units_total
        assert table.filter(pl.col("in_circuit"))["node"].to_list() == doc.nodes
        assert set(table["kind"].unique()) == {"input", "head", "mlp"}
    # per-prompt tables average to circuit.json's numbers (the statistics stage checks the same)
    cp = pl.read_parquet(paths["circuit_prompts_parquet"])
    for col, want in (("m_full", doc.m_full), ("m_empty", doc.m_empty), ("m_circuit", doc.m_circuit)):
        assert cp[col].mean() == pytest.approx(want, rel=1e-12, abs=1e-12)
    curve = pl.read_parquet(paths["curve_prompts_parquet"])
    count = f"n_{unit}"
    assert count in curve.columns and ("n_edges" in curve.columns) == (unit == "edges")
    for p in doc.curve:
        rows = curve.filter(pl.col("budget_pct") == p.percent)
        assert rows[count].unique().to_list() == [p.n_units]
        assert rows["metric"].mean() == pytest.approx(p.metric, rel=1e-12, abs=1e-12)
    assert ("Node circuit" in paths["circuit_md"].read_text()) == (unit == "nodes")
