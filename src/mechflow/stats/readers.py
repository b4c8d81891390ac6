"""Reading the statistics stage's inputs: the circuits-stage tables, the circuit and the model card.

Every reader checks its file against the table's contract (`mechflow.contracts.parquet`) and
raises one `DataError` naming the file, the column and the fix (step 1 of `mechflow.stats.stage`):
    - `read_prompts`: `prompts.parquet` (at least 2 unique prompt ids);
    - `read_node_scores`: `node_scores.parquet`, dense over (method, component, prompt);
    - `read_circuit_data`: `circuit.json`, `circuit_prompts.parquet` and `curve_prompts.parquet`
      (an edge circuit, or a node circuit on models without edge patching such as Gemma-3);
    - `read_head_labels`: `head_types.parquet` (the labels FCAS matches);
    - `read_model_card`: `model_card.json`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np
import polars as pl

from mechflow.contracts.models import ModelCard
from mechflow.contracts.names import component_name
from mechflow.contracts.parquet import (
    CIRCUIT_PROMPTS_SCHEMA,
    CURVE_COUNT_COLUMNS,
    CURVE_PROMPTS_SCHEMA,
    HEAD_TYPES_SCHEMA,
    NODE_SCORES_SCHEMA,
    PROMPTS_SCHEMA,
    reader_columns,
)
from mechflow.errors import DataError

if TYPE_CHECKING:
    from mechflow.circuits.result import CircuitFile

logger = logging.getLogger(__name__)

METHODS_ORDER = ("exact", "ap", "ig")  # node_scores methods in this order, then others alphabetically

# The columns each reader checks (loose kinds: any integer width is "int"; "?" allows nulls), from
# the tables' contracts (`mechflow.contracts.parquet`). Node circuits (circuit.json "unit": "nodes")
# count nodes per budget in column n_nodes instead of n_edges (CURVE_COUNT_COLUMNS).
NODE_SCORES_COLUMNS = reader_columns(NODE_SCORES_SCHEMA)
PROMPTS_COLUMNS = reader_columns(PROMPTS_SCHEMA)
HEAD_TYPES_COLUMNS = reader_columns(HEAD_TYPES_SCHEMA, ["component", "layer", "head", "label"])
CIRCUIT_PROMPTS_COLUMNS = reader_columns(CIRCUIT_PROMPTS_SCHEMA)
CURVE_PROMPTS_COLUMNS = reader_columns(CURVE_PROMPTS_SCHEMA)


def _dtype_ok(dtype: pl.DataType, want: str) -> bool:
    want = want.rstrip("?")
    if want == "int":
        return dtype.is_integer()
    if want == "float":
        return dtype.is_float()
    return dtype == pl.String or dtype == pl.Categorical or isinstance(dtype, pl.Enum)


def read_table(path: Path, columns: Mapping[str, str], producer: str = "circuits") -> pl.DataFrame:
    """Read a Parquet table and check its columns.

    Args:
        path: the file.
        columns: column -> "str" | "int" | "float"; a trailing "?" allows nulls (and an all-null column).
        producer: the stage that writes the file (named in the fix).

    Returns:
        The table with string-like columns cast to `pl.String` and the others as read.

    Raises:
        DataError: missing/unreadable file, a missing column, a wrong dtype, nulls or NaN/inf in a
            column that must be complete (message names the file, the column and the fix).
    """
    path = Path(path)
    fix = f"re-run the {producer} stage"
    if not path.exists():
        raise DataError(f"{path}: file does not exist; {fix}")
    try:
        df = pl.read_parquet(path)
    except Exception as exc:  # polars raises several error types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({exc}); {fix}") from exc
    casts = []
    for col, want in columns.items():
        if col not in df.columns:
            raise DataError(f"{path}: missing column {col!r} (have {df.columns}); {fix}")
        dtype = df.schema[col]
        nullable = want.endswith("?")
        if nullable and dtype == pl.Null:
            casts.append(pl.col(col).cast(pl.String))
            continue
        if not _dtype_ok(dtype, want):
            raise DataError(f"{path}: column {col!r} has dtype {dtype}, expected {want.rstrip('?')}; {fix}")
        if not nullable and df[col].null_count():
            raise DataError(f"{path}: column {col!r} has {df[col].null_count()} null value(s); {fix}")
        if want == "float":
            bad = int((~df[col].is_finite()).sum())
            if bad:
                raise DataError(f"{path}: column {col!r} has {bad} NaN/inf value(s); {fix}")
        if want.startswith("str") and dtype != pl.String:
            casts.append(pl.col(col).cast(pl.String))
    return df.with_columns(casts) if casts else df


def read_model_card(path: Path) -> ModelCard:
    """Parse `model_card.json`; `DataError` naming the file if it is missing or invalid."""
    path = Path(path)
    try:
        return ModelCard.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: model card does not exist; re-run the stage that loads the model") from None
    except Exception as exc:
        raise DataError(f"{path}: not a valid model card ({exc}); re-run the stage that loads the model") from exc


@dataclass(frozen=True)
class Prompts:
    """`prompts.parquet` in prompt order."""

    prompt: np.ndarray
    example_id: list[str]
    template: list[str | None]
    clean_metric: np.ndarray
    corrupted_metric: np.ndarray

    def __len__(self) -> int:
        return int(self.prompt.size)


def read_prompts(path: Path) -> Prompts:
    """Read `prompts.parquet`; at least 2 unique prompt ids."""
    df = read_table(path, PROMPTS_COLUMNS).sort("prompt")
    ids = df["prompt"].to_numpy().astype(np.int64)
    if np.unique(ids).size != ids.size:
        raise DataError(f"{path}: column 'prompt' has duplicate ids; one row per prompt; re-run the circuits stage")
    if ids.size < 2:
        raise DataError(f"{path}: {ids.size} prompt(s); the bootstrap needs at least 2 (raise the task's n_prompts)")
    return Prompts(ids, df["example_id"].to_list(), df["template"].to_list(),
                   df["clean_metric"].to_numpy().astype(np.float64),
                   df["corrupted_metric"].to_numpy().astype(np.float64))


@dataclass(frozen=True)
class NodeScores:
    """`node_scores.parquet` as dense arrays.

    Attributes:
        methods: methods present, in the order exact, ap, ig, then others alphabetically.
        components: component names, ordered by (layer, heads before the MLP, head).
        kind / layer / head: [p] per component.
        prompt: [n] prompt ids (sorted; rows of every score matrix).
        scores: method -> [n, p] per-prompt scores.
    """

    methods: list[str]
    components: list[str]
    kind: np.ndarray
    layer: np.ndarray
    head: np.ndarray
    prompt: np.ndarray
    scores: dict[str, np.ndarray]

    def mean(self, method: str) -> np.ndarray:
        return self.scores[method].mean(axis=0)


def read_node_scores(path: Path, prompts: Prompts, n_layers: int) -> NodeScores:
    """Read `node_scores.parquet` and check it is dense over (method, component, prompt)."""
    path = Path(path)
    fix = "re-run the circuits stage"
    df = read_table(path, NODE_SCORES_COLUMNS)
    if df.height == 0:
        raise DataError(f"{path}: no rows; {fix}")
    bad_kind = df.filter(~pl.col("kind").is_in(["head", "mlp"]))
    if bad_kind.height:
        raise DataError(f"{path}: column 'kind' must be 'head' or 'mlp', found {bad_kind['kind'][0]!r}; {fix}")
    comps = df.select("component", "kind", "layer", "head").unique()
    if comps["component"].n_unique() != comps.height:
        dup = comps.filter(pl.col("component").is_duplicated())["component"][0]
        raise DataError(f"{path}: component {dup!r} appears with different kind/layer/head values; {fix}")
    for row in comps.iter_rows(named=True):
        if row["kind"] == "mlp" and row["head"] != -1:
            raise DataError(f"{path}: column 'head' must be -1 for MLP {row['component']!r}; {fix}")
        want = component_name(row["kind"], row["layer"], row["head"])
        if row["component"] != want:
            raise DataError(f"{path}: column 'component' {row['component']!r} does not match kind/layer/head "
                            f"(expected {want!r}); {fix}")
        if not 0 <= row["layer"] < n_layers:
            raise DataError(f"{path}: column 'layer' value {row['layer']} outside [0, {n_layers}) of the model "
                            f"card; the scores and model_card.json come from different models; {fix}")
    comps = comps.with_columns(pl.when(pl.col("kind") == "head").then(0).otherwise(1).alias("_sub")) \
        .sort("layer", "_sub", "head")
    present = df["method"].unique().to_list()
    methods = [m for m in METHODS_ORDER if m in present] + sorted(set(present) - set(METHODS_ORDER))
    ids = prompts.prompt
    extra = set(df["prompt"].unique().to_list()) - set(ids.tolist())
    if extra:
        raise DataError(f"{path}: column 'prompt' has id(s) {sorted(extra)[:5]} not in prompts.parquet; {fix}")
    n, p = ids.size, comps.height
    if df.height != len(methods) * p * n or df.select("method", "component", "prompt").is_duplicated().any():
        counts = df.group_by("method", "component").len().filter(pl.col("len") != n)
        where = (f"e.g. method {counts['method'][0]!r} component {counts['component'][0]!r} has "
                 f"{counts['len'][0]} rows" if counts.height else "duplicate (method, component, prompt) rows")
        raise DataError(f"{path}: expected one row per (method, component, prompt) = {len(methods)} x {p} x {n} "
                        f"rows, got {df.height} ({where}); {fix}")
    comp_idx = {c: i for i, c in enumerate(comps["component"].to_list())}
    row_of = np.full(int(ids.max()) + 1, -1, dtype=np.int64)
    row_of[ids] = np.arange(n)
    scores = {}
    for m in methods:
        sub = df.filter(pl.col("method") == m)
        mat = np.full((n, p), np.nan)
        cols = np.fromiter((comp_idx[c] for c in sub["component"].to_list()), dtype=np.int64, count=sub.height)
        mat[row_of[sub["prompt"].to_numpy().astype(np.int64)], cols] = sub["score"].to_numpy().astype(np.float64)
        if np.isnan(mat).any():
            raise DataError(f"{path}: method {m!r} does not score every component on every prompt; {fix}")
        scores[m] = mat
    return NodeScores(methods, comps["component"].to_list(), comps["kind"].to_numpy(),
                      comps["layer"].to_numpy().astype(np.int64), comps["head"].to_numpy().astype(np.int64),
                      ids, scores)


def _rows_by_prompt(path: Path, df: pl.DataFrame, ids: np.ndarray, what: str, reference: str) -> np.ndarray:
    """Row order of `df` that puts its prompts in the order of `ids` (same set, no duplicates)."""
    got = df["prompt"].to_numpy().astype(np.int64)
    if np.unique(got).size != got.size or set(got.tolist()) != set(ids.tolist()):
        raise DataError(f"{path}: column 'prompt' must list each prompt of {reference} once{what} "
                        f"(got {got.size} rows, {np.unique(got).size} unique ids, expected the {ids.size} ids "
                        f"{ids[:5].tolist()}...); re-run the circuits stage")
    pos = {int(v): i for i, v in enumerate(got)}
    return np.array([pos[int(i)] for i in ids], dtype=np.int64)


@dataclass(frozen=True)
class CircuitData:
    """Per-prompt circuit metrics in prompt order.

    Attributes:
        metrics: [n, 4] columns m_full, m_empty, m_circuit, m_without_circuit.
        budgets: curve budgets in percent (circuit.json's order, else ascending); empty if no curve.
        n_edges: unit count per budget (edges, or nodes for a node circuit).
        curve: [n, len(budgets)] metric per prompt at each budget (None if no curve).
        reference: circuit.json (None if not given).
        shared: the circuit batch is the node-score batch (same examples in the same order), so
            circuit quantities share the node scores' resamples; else they get their own.
        unit: "edges" or "nodes" (circuit.json's ``unit``; from the curve table without it).
    """

    metrics: np.ndarray
    budgets: list[float]
    n_edges: list[int]
    curve: np.ndarray | None
    reference: "CircuitFile | None"
    shared: bool
    unit: str = "edges"

    def __len__(self) -> int:
        return int(self.metrics.shape[0])


def read_circuit_data(prompts: Prompts, circuit: Path | None, circuit_prompts: Path | None,
                      curve_prompts: Path | None) -> CircuitData | None:
    """Read the circuit files, edge or node circuit (None when no circuit is given)."""
    if circuit_prompts is None:
        if curve_prompts is not None:
            raise DataError(f"{curve_prompts}: given without circuit_prompts.parquet, which holds the m(N) and "
                            "m(empty) that normalise the curve; pass both or neither")
        if circuit is not None:
            logger.warning("circuit.json given without circuit_prompts.parquet: circuit quantities get no CIs")
        return None
    from mechflow.circuits.result import read_circuit  # imports torch: only when a circuit is given

    ref = read_circuit(circuit) if circuit is not None else None
    cp = read_table(circuit_prompts, CIRCUIT_PROMPTS_COLUMNS).sort("prompt")
    ids = cp["prompt"].to_numpy().astype(np.int64)
    if np.unique(ids).size != ids.size:
        raise DataError(f"{circuit_prompts}: column 'prompt' has duplicate ids; one row per prompt; "
                        "re-run the circuits stage")
    if ids.size < 2:
        raise DataError(f"{circuit_prompts}: {ids.size} prompt(s); the bootstrap needs at least 2 "
                        "(raise circuits.n_prompts)")
    shared = _same_batch(prompts, ids, ref, Path(circuit_prompts))
    metrics = cp.select("m_full", "m_empty", "m_circuit", "m_without_circuit").to_numpy().astype(np.float64)
    if np.isclose(metrics[:, 0].mean(), metrics[:, 1].mean(), rtol=0, atol=1e-12):
        raise DataError(f"{circuit_prompts}: mean m_full equals mean m_empty, so faithfulness is undefined "
                        "(the corruption does not change the metric; choose another corrupted prompt set)")
    unit = ref.unit if ref is not None else _curve_unit(curve_prompts)
    if curve_prompts is None:
        return CircuitData(metrics, [], [], None, ref, shared, unit)
    count = CURVE_COUNT_COLUMNS[unit]
    cv = read_table(curve_prompts, {**{k: v for k, v in CURVE_PROMPTS_COLUMNS.items() if k != "n_edges"}, count: "int"})
    found = sorted(cv["budget_pct"].unique().to_list())
    if ref is not None:
        budgets = [pt.percent for pt in ref.curve]
        if len(budgets) != len(found) or not np.allclose(sorted(budgets), found, rtol=0, atol=1e-9):
            raise DataError(f"{curve_prompts}: column 'budget_pct' has budgets {found} but circuit.json's curve has "
                            f"{budgets}; both must come from the same circuits run")
    else:
        budgets = found
    curve = np.empty((ids.size, len(budgets)))
    n_edges = []
    for t, pct in enumerate(budgets):
        sub = cv.filter((pl.col("budget_pct") - pct).abs() <= 1e-9)
        sub = sub[_rows_by_prompt(Path(curve_prompts), sub, ids, f" at budget_pct={pct}", "circuit_prompts.parquet")]
        ne = sub[count].unique().to_list()
        if len(ne) != 1:
            raise DataError(f"{curve_prompts}: column '{count}' takes several values {ne} at budget_pct={pct}; "
                            "re-run the circuits stage")
        if ref is not None and ref.curve[t].n_units != ne[0]:
            raise DataError(f"{curve_prompts}: {count}={ne[0]} at budget_pct={pct} but circuit.json says "
                            f"{ref.curve[t].n_units}; both must come from the same circuits run")
        n_edges.append(int(ne[0]))
        curve[:, t] = sub["metric"].to_numpy()
    return CircuitData(metrics, [float(b) for b in budgets], n_edges, curve, ref, shared, unit)


def _curve_unit(curve_prompts: Path | None) -> str:
    """The unit of a curve table without circuit.json: node circuits have an ``n_nodes`` column."""
    if curve_prompts is None or not Path(curve_prompts).exists():
        return "edges"
    try:
        names = pl.read_parquet_schema(curve_prompts).keys()
    except (OSError, pl.exceptions.PolarsError):  # unreadable: read_table reports it with the file name
        return "edges"
    return "nodes" if "n_nodes" in names and "n_edges" not in names else "edges"


def _same_batch(prompts: Prompts, ids: np.ndarray, ref: "CircuitFile | None", path: Path) -> bool:
    """Whether the circuit's prompts are the node-score prompts (by example id when circuit.json has them)."""
    ex_ids = ref.prompts.prompt_ids if ref is not None else None
    if ex_ids is not None:
        if ids.tolist() != list(range(len(ex_ids))):
            raise DataError(f"{path}: column 'prompt' must be 0..{len(ex_ids) - 1}, one per prompt of circuit.json "
                            f"(got {ids[:5].tolist()}...); both must come from the same circuits run")
        same = list(map(str, ex_ids)) == list(prompts.example_id)
    else:
        same = ids.tolist() == prompts.prompt.tolist()
    if not same:
        logger.warning("%s: the circuit batch (%d prompts) differs from the node-score batch (%d prompts); "
                       "circuit quantities are resampled over their own prompts", path, ids.size, len(prompts))
    return same


def read_head_labels(path: Path | None, ns: NodeScores) -> np.ndarray | None:
    """[p] function label per component from `head_types.parquet` (MLPs "mlp"); None if absent."""
    if path is None or not Path(path).exists():
        return None
    df = read_table(path, HEAD_TYPES_COLUMNS, producer="head typing")
    if df["component"].n_unique() != df.height:
        raise DataError(f"{path}: column 'component' has duplicates; one label per head; re-run head typing")
    labels = dict(zip(df["component"].to_list(), df["label"].to_list()))
    out = np.array(["mlp" if k == "mlp" else labels.get(c, "other") for c, k in zip(ns.components, ns.kind)],
                   dtype=object)
    missing = sum(1 for c, k in zip(ns.components, ns.kind) if k == "head" and c not in labels)
    if missing:
        logger.warning("%s: %d head(s) have no label; they are labelled 'other'", path, missing)
    return out


def coarse_labels(ns: NodeScores) -> np.ndarray:
    return np.array(["mlp" if k == "mlp" else "head" for k in ns.kind], dtype=object)
