"""Parquet layouts.

Activation shards (one folder per (model, hook)):
    context_id  int64    index of the context in the tokenized corpus
    position    int32    token position inside the context (0 = first token, BOS if prepended)
    token_id    int32    the token at that position
    activation  fixed_size_list<float16|bfloat16|float32>[d]  the hook's vector at that position

Corpus tokens (one row per fixed-length context):
    context_id  int64
    tokens      list<int32>  exactly `context_size` ids (BOS first when prepended)

Exact edge reference (`edge_reference.parquet`, one row per edge removed alone; the run
document — prompts, m(N), m(empty), sampling, timings — in the footer under
`mechflow.edge_reference`):
    edge, sender, receiver  string   MIB names, e.g. ``a3.h1->a7.h2<v>``
    receiver_layer          int32    the receiver's layer (logits: n_layers)
    restricted, sampled     bool     in the restricted graph / in the stratified full-graph sample
    sampling_weight         float64  stratum size / stratum sample size (null if not sampled)
    exact_effect            float64  m(N without e) - m(N), mean over prompts
    config_hash, prompts_hash string

The schema version is written to each file's footer metadata under `mechflow.schema_version`.
"""

from __future__ import annotations

import pyarrow as pa

ACTIVATIONS_SCHEMA_VERSION = "1"
CORPUS_SCHEMA_VERSION = "1"
SCHEMA_VERSION_KEY = b"mechflow.schema_version"

ACTIVATION_DTYPES: dict[str, pa.DataType] = {
    "float32": pa.float32(),
    "float16": pa.float16(),
    # Arrow has no native bfloat16: stored as its upper 16 bits in uint16 (documented, lossless).
    "bfloat16": pa.uint16(),
}


def activations_schema(d: int, dtype: str = "float32", extra_metadata: dict | None = None) -> pa.Schema:
    """Schema of one activation shard with vectors of width `d` stored as `dtype`."""
    if dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"activation dtype {dtype!r} not in {sorted(ACTIVATION_DTYPES)}")
    meta = {SCHEMA_VERSION_KEY: ACTIVATIONS_SCHEMA_VERSION.encode(), b"mechflow.dtype": dtype.encode()}
    for k, v in (extra_metadata or {}).items():
        meta[f"mechflow.{k}".encode()] = str(v).encode()
    return pa.schema(
        [
            pa.field("context_id", pa.int64(), nullable=False),
            pa.field("position", pa.int32(), nullable=False),
            pa.field("token_id", pa.int32(), nullable=False),
            pa.field("activation", pa.list_(ACTIVATION_DTYPES[dtype], d), nullable=False),
        ],
        metadata=meta,
    )


CORPUS_SCHEMA = pa.schema(
    [
        pa.field("context_id", pa.int64(), nullable=False),
        pa.field("tokens", pa.list_(pa.int32()), nullable=False),
    ],
    metadata={SCHEMA_VERSION_KEY: CORPUS_SCHEMA_VERSION.encode()},
)


EDGE_REFERENCE_SCHEMA = pa.schema([
    ("edge", pa.string()), ("sender", pa.string()), ("receiver", pa.string()),
    ("receiver_layer", pa.int32()),  # logits: n_layers
    ("restricted", pa.bool_()),  # in the restricted graph
    ("sampled", pa.bool_()),  # in the stratified full-graph sample
    ("sampling_weight", pa.float64()),  # stratum size / stratum sample size (null if not sampled)
    ("exact_effect", pa.float64()),  # m(N without e) - m(N), mean over prompts
    ("config_hash", pa.string()), ("prompts_hash", pa.string()),
])
