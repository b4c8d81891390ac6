"""Parquet layouts: one pyarrow schema per table mechflow writes or reads.

Activation shards (one folder per (model, hook); `activations_schema`):
    context_id  int64    index of the context in the tokenized corpus
    position    int32    token position inside the context (0 = first token, BOS if prepended)
    token_id    int32    the token at that position
    activation  fixed_size_list<float16|bfloat16|float32>[d]  the hook's vector at that position

Corpus tokens (one row per fixed-length context; `CORPUS_SCHEMA`):
    context_id  int64
    tokens      list<int32>  exactly `context_size` ids (BOS first when prepended)

Exact edge reference (`edge_reference.parquet`, one row per edge removed alone; the run
document — prompts, m(N), m(empty), sampling, timings — in the footer under
`mechflow.edge_reference`, `mechflow.contracts.reference.EdgeReferenceDocument`):
    edge, sender, receiver  string   MIB names, e.g. ``a3.h1->a7.h2<v>``
    receiver_layer          int32    the receiver's layer (logits: n_layers)
    restricted, sampled     bool     in the restricted graph / in the stratified full-graph sample
    sampling_weight         float64  stratum size / stratum sample size (null if not sampled)
    exact_effect            float64  m(N without e) - m(N), mean over prompts
    config_hash, prompts_hash string

The other tables (attribution, analysis, circuits, features, statistics, benchmark) are listed below, each with its
writer and readers. Tables written through polars store strings as ``large_string``. A field's
``nullable`` says whether the column may hold nulls (an all-null column may then be of type
``null``); field metadata ``mechflow.optional`` marks a column that is present only sometimes.
The schema version policy (`mechflow.contracts.versions`): activation shards and corpus tokens
carry ``mechflow.schema_version`` in their footer; the others are version "1" without it.
"""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa

from mechflow.contracts.versions import SCHEMA_VERSION, SCHEMA_VERSION_KEY

# Kept for callers of the per-table constants: every layout is at the one contract version.
ACTIVATIONS_SCHEMA_VERSION = SCHEMA_VERSION
CORPUS_SCHEMA_VERSION = SCHEMA_VERSION
UNIT_KEY = b"mechflow.unit"  # footer key of the circuit tables: "edges" or "nodes"
OPTIONAL = {b"mechflow.optional": b"true"}  # field metadata: the column is present only sometimes

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

_S, _I32, _I64, _F64, _B = pa.large_string(), pa.int32(), pa.int64(), pa.float64(), pa.bool_()


def _required(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=False)


# ----------------------------------------------------------------------------- attribution (rule attribute)

# node_scores.parquet: one row per (method, component, prompt); component is a MIB name
# (a{layer}.h{head} for kind head, m{layer} with head -1 for kind mlp). Writer:
# attribution/stage.py; readers: stats (read_node_scores), reference (node_part).
NODE_SCORES_SCHEMA = pa.schema([
    _required("method", _S), _required("component", _S), _required("kind", _S), _required("layer", _I32),
    _required("head", _I32), _required("prompt", _I32), _required("score", _F64),
])

# prompts.parquet: one row per prompt of the attribution batch.
PROMPTS_SCHEMA = pa.schema([
    _required("prompt", _I32), _required("example_id", _S), pa.field("template", _S),
    _required("clean_metric", _F64), _required("corrupted_metric", _F64),
])

HEAD_SCORE_KINDS = ("previous_token", "induction", "duplicate_token", "bos")  # attribution.head_types.SCORE_KINDS

# head_types.parquet: one row per head; label = the best head type above the threshold ("sink" for
# bos), else "other" (IOI tasks: name_mover / s_inhibition from ioi_role).
HEAD_TYPES_SCHEMA = pa.schema([
    _required("component", _S), _required("layer", _I32), _required("head", _I32), _required("label", _S),
    *[_required(k, _F64) for k in HEAD_SCORE_KINDS],
    pa.field("ioi_role", _S, metadata=OPTIONAL),
])

# lens.parquet / dla.parquet ("scores frame": component, layer, head, score, method, then extras).
SCORES_FRAME_SCHEMA = pa.schema([
    _required("component", _S), pa.field("layer", _I64), pa.field("head", _I64), _required("score", _F64),
    _required("method", _S),
])
LENS_SCHEMA = pa.schema([*SCORES_FRAME_SCHEMA, _required("std", _F64), _required("n", _I64),
                         _required("point", _S)])
DLA_SCHEMA = SCORES_FRAME_SCHEMA

# ----------------------------------------------------------------------------- analysis (rules analyze, causal_trace)

# ablations.parquet: per (method, component, prompt) m(ablated) - m(clean), the node_scores columns
# (method = zero | mean | resample), then the prompt's id and clean metric and what replaced the
# activation. Writer: attribution/analyze.py; reader: attribution/analysis_report.py.
ABLATIONS_SCHEMA = pa.schema([
    *NODE_SCORES_SCHEMA, _required("example_id", _S), _required("clean_metric", _F64), _required("reference", _S),
])

# saliency.parquet: per (method, prompt, position) token saliency (gradient_norm, gradient_x_input,
# integrated_gradients), with the prompt's IG completeness check repeated on each of its rows; token is
# null when no tokenizer was available.
SALIENCY_SCHEMA = pa.schema([
    _required("method", _S), _required("prompt", _I32), _required("example_id", _S), _required("position", _I32),
    _required("token_id", _I64), pa.field("token", _S), _required("score", _F64), _required("metric", _F64),
    _required("baseline_metric", _F64), _required("ig_baseline", _S), _required("ig_steps", _I32),
    _required("ig_completeness_residual", _F64), _required("ig_tolerance", _F64), _required("ig_complete", _B),
])

# neurons.parquet: per (method, rank, context_rank) a top MLP neuron (method = neuron_dla | neuron_ap)
# with one of its top-activating contexts; context is null when no tokenizer was available.
NEURONS_SCHEMA = pa.schema([
    _required("method", _S), _required("rank", _I64), _required("component", _S), _required("layer", _I64),
    _required("neuron", _I64), _required("score", _F64), _required("dla_score", _F64), _required("ap_score", _F64),
    _required("context_rank", _I64), _required("activation", _F64), _required("context_id", _I64),
    _required("position", _I64), _required("token_id", _I64), _required("context_token_ids", pa.large_list(_I64)),
    pa.field("context", _S), _required("context_source", _S),
])

# causal_tracing.parquet: per (kind, layer, position, prompt) the indirect effect of restoring that
# clean state (kind = resid | mlp | attn), the position's ROME role and the prompt's metrics.
CAUSAL_TRACING_SCHEMA = pa.schema([
    _required("kind", _S), _required("layer", _I32), _required("position", _I32), _required("role", _S),
    _required("is_subject", _B), _required("prompt", _I32), _required("example_id", _S), _required("token_id", _I64),
    _required("score", _F64), _required("m_clean", _F64), _required("m_corrupted", _F64),
    _required("m_restore_all", _F64), _required("metric", _S), _required("window", _I32), _required("sigma", _F64),
    _required("n_samples", _I32),
])

# ----------------------------------------------------------------------------- circuits (rule circuit)

# circuit_prompts.parquet: per prompt of the circuit batch.
CIRCUIT_PROMPTS_SCHEMA = pa.schema([
    _required("prompt", _I32), _required("m_full", _F64), _required("m_empty", _F64), _required("m_circuit", _F64),
    _required("m_without_circuit", _F64),
])

CURVE_COUNT_COLUMNS = {"edges": "n_edges", "nodes": "n_nodes"}  # curve_prompts' unit count column


def curve_prompts_schema(unit: str = "edges") -> pa.Schema:
    """curve_prompts.parquet: per (budget, prompt), the unit count column is ``n_edges`` / ``n_nodes``."""
    return pa.schema([
        _required("budget_pct", _F64), _required(CURVE_COUNT_COLUMNS[unit], _I64), _required("prompt", _I32),
        _required("metric", _F64),
    ])


CURVE_PROMPTS_SCHEMA = curve_prompts_schema("edges")
NODE_CURVE_PROMPTS_SCHEMA = curve_prompts_schema("nodes")

# edge_scores.parquet of an edge circuit: every edge, best first.
EDGE_SCORES_SCHEMA = pa.schema([
    _required("edge", _S), _required("sender", _S), _required("receiver", _S), _required("score", _F64),
    _required("rank", _I64), _required("in_circuit", _B),
])

# edge_scores.parquet of a node circuit (the rule's file name is kept): every node, best first.
NODE_RANKING_SCHEMA = pa.schema([
    _required("node", _S), _required("kind", _S), _required("layer", _I64), _required("head", _I64),
    _required("score", _F64), _required("rank", _I64), _required("in_circuit", _B),
])


def edge_scores_schema(unit: str = "edges") -> pa.Schema:
    """The score table of a circuit of ``unit`` (its footer's ``UNIT_KEY`` says which)."""
    return EDGE_SCORES_SCHEMA if unit == "edges" else NODE_RANKING_SCHEMA


# ----------------------------------------------------------------------------- features (rule features)

# task_attribution.parquet: one row per (task, SAE latent) of the feature analysis; exact_effect null
# where the latent was not verified by exact ablation (`mechflow.features.attribution`).
TASK_ATTRIBUTION_SCHEMA = pa.schema([
    _required("task", _S), _required("feature", _I32), _required("attribution", _F64),
    _required("attribution_std", _F64), _required("rank", _I32), _required("clean_activation", _F64),
    _required("target_activation", _F64), _required("verified", _B), pa.field("exact_effect", _F64),
])

# ----------------------------------------------------------------------------- statistics

# bootstrap.parquet (also bootstrap.csv): one row per quantity; bounds null where not computed.
BOOTSTRAP_SCHEMA = pa.schema([
    _required("quantity", _S), _required("group", _S), pa.field("method", _S), pa.field("component", _S),
    *[pa.field(c, _F64) for c in ("estimate", "se", "percentile_lo", "percentile_hi", "bca_lo", "bca_hi",
                                  "reference")],
    _required("ci_level", _F64), _required("n_prompts", _I64), _required("B", _I64), _required("seed", _I64),
    _required("resample_set", _S),
])

# cka.parquet (also cka.csv): one row per (layer of A, layer of B).
CKA_SCHEMA = pa.schema([
    _required("layer_a", _I64), _required("layer_b", _I64), _required("depth_a", _F64), _required("depth_b", _F64),
    pa.field("cka", _F64), pa.field("cka_debiased", _F64),
])

# ----------------------------------------------------------------------------- benchmark

# acdc_steps.parquet: every ACDC decision (metric_after null when the edge was not evaluated).
ACDC_STEPS_SCHEMA = pa.schema([
    ("threshold", pa.float64()), ("step", pa.int32()), ("edge", pa.string()), ("metric_before", pa.float64()),
    ("metric_after", pa.float64()), ("evaluated", pa.bool_()), ("removed", pa.bool_()),
])


# ----------------------------------------------------------------------------- checks


def is_optional(field: pa.Field) -> bool:
    return (field.metadata or {}).get(b"mechflow.optional") == b"true"


def schema_mismatches(actual: pa.Schema, contract: pa.Schema) -> list[str]:
    """What differs between a table's schema and its contract: names, order and types.

    Nullability and metadata are not compared (polars writes every column nullable); a nullable
    contract column may be of type ``null`` (every value null); optional columns may be absent.
    """
    problems = []
    names = [f.name for f in contract]
    wanted = [n for n in names if n in actual.names or not is_optional(contract.field(n))]
    extra = [n for n in actual.names if n not in names]
    missing = [n for n in wanted if n not in actual.names]
    if missing or extra:
        problems.append(f"columns {actual.names}, expected {wanted}")
    elif [n for n in actual.names] != wanted:
        problems.append(f"column order {actual.names}, expected {wanted}")
    for name in wanted:
        if name not in actual.names:
            continue
        have, want = actual.field(name), contract.field(name)
        if have.type != want.type and not (want.nullable and pa.types.is_null(have.type)):
            problems.append(f"column {name!r} is {have.type}, expected {want.type}")
    return problems


def check_schema(actual: pa.Schema, contract: pa.Schema, what: str) -> None:
    """ValueError listing every mismatch between ``actual`` and the ``contract`` of ``what``."""
    problems = schema_mismatches(actual, contract)
    if problems:
        raise ValueError(f"{what} does not match its contract (mechflow.contracts.parquet): " + "; ".join(problems))


def reader_columns(contract: pa.Schema, names: list[str] | None = None) -> dict[str, str]:
    """column -> "str" | "int" | "float" | "bool", with "?" when nulls are allowed: the loose column
    kinds a reader checks (any integer width is an int, string or categorical a str)."""
    out = {}
    for f in contract:
        if names is not None and f.name not in names:
            continue
        t = f.type
        kind = ("int" if pa.types.is_integer(t) else "float" if pa.types.is_floating(t)
                else "bool" if pa.types.is_boolean(t) else "str")
        out[f.name] = kind + ("?" if f.nullable else "")
    return out


def footer_metadata(schema: pa.Schema) -> Mapping[str, str]:
    """A schema's metadata as text (for rendering)."""
    return {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}

# ----------------------------------------------------------------------------- graphs (rule attribution_graph)

# validation.parquet: one row per intervention on a graph feature (mechflow.graphs.validation).
GRAPH_VALIDATION_SCHEMA = pa.schema([
    _required("node", _I32), _required("layer", _I32), _required("position", _I32), _required("feature", _I64),
    _required("activation", _F64), _required("operation", _S), _required("delta", _F64),
    _required("predicted_direct", _F64), _required("predicted_graph", _F64), _required("real", _F64),
    _required("frozen", _F64), pa.field("predicted_direct_diff", _F64), pa.field("predicted_graph_diff", _F64),
    pa.field("real_diff", _F64), _required("selection", _S),  # top | excluding_positions (validation module)
])

# ----------------------------------------------------------------------------- rule transcoder_features

# dictionaries/transcoder_set/features/top_contexts.parquet: every live feature's top activating
# corpus contexts (rank 0 = highest; position 0 of a context is never a row). Writer:
# mechflow.features.transcoders; reader: mechflow.graphs.stage (the viewer's hover).
TRANSCODER_TOP_CONTEXTS_SCHEMA = pa.schema([
    _required("layer", _I32), _required("feature", _I32), _required("rank", _I32),
    _required("activation", pa.float32()), _required("context_id", _I64), _required("position", _I32),
])

# dictionaries/transcoder_set/features/feature_stats.parquet: one row per (layer, feature) over the
# stage's corpus tokens; mean_active / max are 0 for a feature that never fires.
TRANSCODER_FEATURE_STATS_SCHEMA = pa.schema([
    _required("layer", _I32), _required("feature", _I32), _required("n_active", _I64), _required("frequency", _F64),
    _required("mean_active", _F64), _required("max", _F64),
])


def write_table(table, path, contract: pa.Schema) -> None:
    """Write `table` (a pyarrow Table or a polars DataFrame) to `path` as zstd Parquet, atomically,
    after checking it against `contract`; a table that does not match is a bug (ValueError). The one
    writer of the stages' contract tables (attribution, features, graphs)."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from mechflow.io import atomic_path

    arrow = isinstance(table, pa.Table)
    check_schema(table.schema if arrow else table.head(0).to_arrow().schema, contract, Path(path).name)
    with atomic_path(path) as tmp:
        if arrow:
            pq.write_table(table, tmp, compression="zstd")
        else:
            table.write_parquet(tmp, compression="zstd")
