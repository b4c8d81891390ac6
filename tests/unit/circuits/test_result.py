"""circuit.json round trip and independent re-evaluation from the file alone."""

from __future__ import annotations

import json

import pytest
from circuit_fixtures import pairs, spec

from mechflow.circuits.config import CircuitConfig
from mechflow.circuits.core import discover_circuit
from mechflow.circuits.result import read_circuit, reevaluate_circuit, write_circuit
from mechflow.errors import DataError


def test_discover_write_reevaluate(tiny_llama, tmp_path):
    b = pairs(8, n=3)
    cfg = CircuitConfig(target=0.7, ig_steps=3)
    doc, _ = discover_circuit(tiny_llama, b, cfg, model_cfg={"name": "tiny_llama", "dtype": "float64"},
                                   metric_spec=spec(), prompt_ids=["p0", "p1", "p2"], dataset_sha256="0" * 64)
    path = write_circuit(tmp_path / "circuit.json", doc)
    back = read_circuit(path)
    assert back == doc and back.n_edges == len(back.edges) and back.faithfulness >= 0.7
    assert back.config_hash == cfg.hash() and back.n_edges_total == 110
    again = reevaluate_circuit(path, model=tiny_llama)
    for k in ("m_full", "m_empty", "m_circuit", "faithfulness"):
        assert again[k] == pytest.approx(getattr(back, k), abs=1e-10), k
    # edges are listed best first by |score|
    mags = [abs(e.score) for e in back.edges]
    assert mags == sorted(mags, reverse=True)


def test_bad_file_is_data_error(tmp_path):
    p = tmp_path / "circuit.json"
    p.write_text(json.dumps({"schema_version": "1", "model": {}}))
    with pytest.raises(DataError, match="circuit.json"):
        read_circuit(p)
