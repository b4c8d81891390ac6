"""Parquet contracts: the check, the readers' column kinds, and the attribution tables' real frames."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from mechflow.contracts import parquet as c
from mechflow.contracts.versions import SCHEMA_VERSION, SCHEMA_VERSION_KEY


def test_versioned_tables_carry_the_contract_version_in_their_footer():
    assert c.CORPUS_SCHEMA.metadata[SCHEMA_VERSION_KEY] == SCHEMA_VERSION.encode()
    for dtype in c.ACTIVATION_DTYPES:
        assert c.activations_schema(8, dtype).metadata[SCHEMA_VERSION_KEY] == SCHEMA_VERSION.encode()


def test_schema_check_compares_names_order_and_types_only():
    contract = pa.schema([pa.field("a", pa.int32(), nullable=False), pa.field("b", pa.large_string()),
                          pa.field("c", pa.float64(), metadata=c.OPTIONAL)])
    assert c.schema_mismatches(pa.schema([("a", pa.int32()), ("b", pa.large_string())]), contract) == []
    assert c.schema_mismatches(pa.schema([("a", pa.int32()), ("b", pa.null())]), contract) == []  # all-null column
    assert c.schema_mismatches(pa.schema([("a", pa.int64()), ("b", pa.large_string())]), contract) == [
        "column 'a' is int64, expected int32"]
    assert "order" in c.schema_mismatches(pa.schema([("b", pa.large_string()), ("a", pa.int32())]), contract)[0]
    assert "expected ['a', 'b']" in c.schema_mismatches(pa.schema([("a", pa.int32())]), contract)[0]
    with pytest.raises(ValueError, match="x.parquet does not match its contract"):
        c.check_schema(pa.schema([("a", pa.null())]), contract, "x.parquet")


def test_reader_column_kinds_are_the_stats_readers_maps():
    assert c.reader_columns(c.NODE_SCORES_SCHEMA) == {
        "method": "str", "component": "str", "kind": "str", "layer": "int", "head": "int", "prompt": "int",
        "score": "float"}
    assert c.reader_columns(c.PROMPTS_SCHEMA) == {
        "prompt": "int", "example_id": "str", "template": "str?", "clean_metric": "float", "corrupted_metric": "float"}
    assert c.reader_columns(c.HEAD_TYPES_SCHEMA, ["component", "layer", "head", "label"]) == {
        "component": "str", "layer": "int", "head": "int", "label": "str"}
    assert c.reader_columns(c.CIRCUIT_PROMPTS_SCHEMA) == {
        "prompt": "int", "m_full": "float", "m_empty": "float", "m_circuit": "float", "m_without_circuit": "float"}
    assert c.reader_columns(c.CURVE_PROMPTS_SCHEMA) == {
        "budget_pct": "float", "n_edges": "int", "prompt": "int", "metric": "float"}
    assert c.reader_columns(c.NODE_CURVE_PROMPTS_SCHEMA)["n_nodes"] == "int"


def test_attribution_tables_match_their_contracts(tiny_llama):
    from mechflow.attribution.head_types import SCORE_KINDS, head_type_scores
    from mechflow.attribution.lens import direct_logit_attribution, logit_lens
    from mechflow.attribution.stage import _head_labels, long_rows

    L, H = tiny_llama.cfg.n_layers, tiny_llama.cfg.n_heads
    rows = long_rows("exact", torch.randn(L, H, 3), torch.randn(L, 3))
    c.check_schema(rows.to_arrow().schema, c.NODE_SCORES_SCHEMA, "node_scores.parquet")
    assert tuple(SCORE_KINDS) == c.HEAD_SCORE_KINDS
    labels = _head_labels(head_type_scores(tiny_llama, n_seqs=2, seq_len=8), 0.3)
    c.check_schema(labels.to_arrow().schema, c.HEAD_TYPES_SCHEMA, "head_types.parquet")
    tokens = torch.randint(0, tiny_llama.cfg.d_vocab, (3, 6), generator=torch.Generator().manual_seed(0))
    answer, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    c.check_schema(logit_lens(tiny_llama, tokens, answer, wrong).to_frame().to_arrow().schema, c.LENS_SCHEMA,
                   "lens.parquet")
    c.check_schema(direct_logit_attribution(tiny_llama, tokens, answer, wrong).to_frame().to_arrow().schema,
                   c.DLA_SCHEMA, "dla.parquet")
