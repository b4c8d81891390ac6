"""Statistics stage: circuits-stage tables -> confidence intervals, ranking stability, cross-model alignment.

`run_statistics` (one model, one task), after Efron & Tibshirani (1993) for the bootstrap and
MIB (Mueller et al. 2025) for the circuit quantities:
    1. Read and check the circuits-stage tables (`node_scores.parquet`, `prompts.parquet`, and
       and the circuit rule's `circuit.json`, `circuit_prompts.parquet`, `curve_prompts.parquet`
       (an edge circuit, or a node circuit on models without edge patching such as Gemma-3);
       every problem is one `DataError` naming the file and column.
    2. Stack every per-prompt quantity into one matrix X [n_prompts, q]: each method's score of
       each component, the clean and corrupted task metric, m(N), m(empty), m(C), m(N minus C)
       and the metric at every curve budget.
    3. Draw the prompt resample indices ONCE ([B, n], `stats.seed`) and bootstrap every
       statistic from them (`bootstrap_mean_functional`): plain means, faithfulness as a ratio
       of means, comprehensiveness, F1, and CPR/CMD with the circuits stage's own
       `area_metrics` applied to each resample. All CIs therefore describe the same resamples.
    4. Check that the point estimates of the circuit quantities equal the numbers in
       circuit.json (the two files must come from the same circuits run).
    5. Ranking stability (Kendall tau-b, top-k Jaccard): between methods, across bootstrap
       resamples (the same indices), across prompt templates.
    6. Write bootstrap.parquet/.csv, stability.json, stability_methods.csv, forest.png,
       tau_heatmap.png and statistics.md, each atomically, after every input has been checked, to
       exactly the paths the caller names (the rule's outputs; `stats_outputs(folder)` gives the
       default file names in one folder).

`run_cross_model` (two models, the same task): FCAS between the exact-patching component
scores with its sampled permutation null (`fcas.py`), and linear CKA by relative depth between
the residual streams at the last prompt token (Kornblith et al. 2019) on the union of both task
datasets' prompt texts, each model reading every text with its own tokenization. It writes
exactly the paths the caller names (`cross_model_outputs(folder)`: the default file names).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import polars as pl

from mechflow.contracts.documents import write_document
from mechflow.contracts.models import ModelCard
from mechflow.contracts.names import component_name
from mechflow.contracts.parquet import (
    BOOTSTRAP_SCHEMA,
    CIRCUIT_PROMPTS_SCHEMA,
    CURVE_COUNT_COLUMNS,
    CURVE_PROMPTS_SCHEMA,
    HEAD_TYPES_SCHEMA,
    NODE_SCORES_SCHEMA,
    PROMPTS_SCHEMA,
    reader_columns,
)
from mechflow.contracts.stats import CkaDocument, FcasDocument, StabilityDocument
from mechflow.errors import ConfigError, DataError
from mechflow.io import atomic_path, atomic_write_text, outputs_in
from mechflow.stats.bootstrap import BootstrapResult, bootstrap_mean_functional, resample_indices
from mechflow.stats.cka import DepthCKA, cka_by_depth
from mechflow.stats.config import StatsConfig
from mechflow.stats.fcas import FCASResult, ModelComponents, fcas_test
from mechflow.stats.output import null_histogram, summarize_cka, write_table_files
from mechflow.stats.stability import (
    PairwiseStability,
    bootstrap_rank_stability,
    pairwise_stability,
    top_k_set,
)

if TYPE_CHECKING:
    from mechflow.circuits.result import CircuitFile

logger = logging.getLogger(__name__)

METHODS_ORDER = ("exact", "ap", "ig")
MIN_CKA_PROMPTS = 8
# circuit.json and circuit_prompts.parquet hold the same means up to summation order (~1e-16)
REFERENCE_RTOL = 1e-9

# The columns each reader checks (loose kinds: any integer width is "int"; "?" allows nulls), from
# the tables' contracts (`mechflow.contracts.parquet`). Node circuits (circuit.json "unit": "nodes")
# count nodes per budget in column n_nodes instead of n_edges (CURVE_COUNT_COLUMNS).
NODE_SCORES_COLUMNS = reader_columns(NODE_SCORES_SCHEMA)
PROMPTS_COLUMNS = reader_columns(PROMPTS_SCHEMA)
HEAD_TYPES_COLUMNS = reader_columns(HEAD_TYPES_SCHEMA, ["component", "layer", "head", "label"])
CIRCUIT_PROMPTS_COLUMNS = reader_columns(CIRCUIT_PROMPTS_SCHEMA)
CURVE_PROMPTS_COLUMNS = reader_columns(CURVE_PROMPTS_SCHEMA)

# Output name (the rule's `output:` name, the stage function's keyword) -> default file name.
STATS_OUTPUTS = {"bootstrap": "bootstrap.parquet", "bootstrap_csv": "bootstrap.csv", "stability": "stability.json",
                 "stability_methods": "stability_methods.csv", "forest": "forest.png",
                 "tau_heatmap": "tau_heatmap.png", "summary": "statistics.md"}
CROSS_MODEL_OUTPUTS = {"fcas": "fcas.json", "fcas_null": "fcas_null.png", "summary": "cross_model.md"}
CKA_OUTPUTS = {"cka": "cka.json", "cka_table": "cka.parquet", "cka_csv": "cka.csv", "cka_figure": "cka.png"}


def stats_outputs(folder: str | Path) -> dict[str, Path]:
    """`run_statistics`' output paths with their default file names in `folder` (library and test
    callers: ``run_statistics(cfg, **inputs, **stats_outputs(folder))``)."""
    return outputs_in(folder, STATS_OUTPUTS)


def cross_model_outputs(folder: str | Path, *, cka: bool = True) -> dict[str, Path]:
    """`run_cross_model`'s output paths with their default file names in `folder`; with ``cka=False``
    without the four CKA files (for a caller that runs without activations)."""
    return outputs_in(folder, {**CROSS_MODEL_OUTPUTS, **(CKA_OUTPUTS if cka else {})})


CIRCUIT_QUANTITIES = ("m_full", "m_empty", "m_circuit", "faithfulness", "sufficiency", "comprehensiveness", "f1")
CURVE_QUANTITIES = ("cpr", "cmd")


# ----------------------------------------------------------------------------- reading inputs


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


# ----------------------------------------------------------------------------- bootstrap


def circuit_functional(budgets: Sequence[float], n_edges: Sequence[int]):
    """Map means [..., 4 + T] (m_full, m_empty, m_circuit, m_without_circuit, curve metrics) to
    [..., 7 (+2)] = `CIRCUIT_QUANTITIES` (+ `CURVE_QUANTITIES` when T > 0).

    Exactly the circuits stage's formulas (`mechflow.circuits.faithfulness`): f = (m_C - m_0) /
    (m_N - m_0); sufficiency = f(C); comprehensiveness = 1 - f(N minus C); F1 = harmonic mean
    of the two clipped to [0, 1] (0 when both are 0); CPR/CMD = `area_metrics` of the curve whose
    points are normalised with the same m_N, m_0 (arrays pass through it elementwise).
    """
    from mechflow.circuits.faithfulness import CurvePoint, area_metrics  # the circuits stage's own area rule

    budgets, n_edges = list(budgets), list(n_edges)

    def fn(means: np.ndarray) -> np.ndarray:
        mn, m0, mc, mw = (means[..., i] for i in range(4))
        denom = mn - m0
        f = (mc - m0) / denom
        comp = 1.0 - (mw - m0) / denom
        s, c = np.clip(f, 0.0, 1.0), np.clip(comp, 0.0, 1.0)
        tot = s + c
        f1 = np.where(tot > 0, 2 * s * c / np.where(tot > 0, tot, 1.0), 0.0)
        out = [mn, m0, mc, f, f, comp, f1]
        if budgets:
            points = [CurvePoint(pct, ne, means[..., 4 + t], (means[..., 4 + t] - m0) / denom)
                      for t, (pct, ne) in enumerate(zip(budgets, n_edges))]
            areas = area_metrics(points)
            out += [np.broadcast_to(np.asarray(areas[k], dtype=np.float64), f.shape) for k in CURVE_QUANTITIES]
        return np.stack(out, axis=-1)

    return fn


@dataclass(frozen=True)
class Quantities:
    """The stacked per-prompt matrix and the statistic names / groups the functional returns."""

    X: np.ndarray
    names: list[str]
    group: list[str]
    method: list[str | None]
    component: list[str | None]
    n_direct: int  # the first n_direct columns of X are reported as plain means
    circuit: CircuitData | None

    def functional(self):
        if self.circuit is None:
            return None
        k = self.n_direct
        cfn = circuit_functional(self.circuit.budgets, self.circuit.n_edges)
        return lambda m: np.concatenate([m[..., :k], cfn(m[..., k:])], axis=-1)


def build_quantities(scores: NodeScores | None, prompts: Prompts | None, circuit: CircuitData | None) -> Quantities:
    """Stack every per-prompt column of one prompt set (step 2) and name the statistics.

    Pass `scores` and `prompts` for the node-score batch (with `circuit` when it is the same
    batch), or only `circuit` for a circuit batch of its own.
    """
    cols, names, group, method, comp = [], [], [], [], []
    if scores is not None and prompts is not None:
        for m in scores.methods:
            cols.append(scores.scores[m])
            names += [f"score:{m}:{c}" for c in scores.components]
            group += ["score"] * len(scores.components)
            method += [m] * len(scores.components)
            comp += list(scores.components)
        cols.append(np.stack([prompts.clean_metric, prompts.corrupted_metric], axis=1))
        names += ["task:clean_metric", "task:corrupted_metric"]
        group += ["task", "task"]
        method += [None, None]
        comp += [None, None]
    n_direct = sum(c.shape[1] for c in cols)
    if circuit is not None:
        cols.append(circuit.metrics)
        qs = list(CIRCUIT_QUANTITIES)
        if circuit.curve is not None:
            cols.append(circuit.curve)
            qs += list(CURVE_QUANTITIES)
        names += [f"circuit:{q}" for q in qs]
        group += ["circuit"] * len(qs)
        method += [None] * len(qs)
        comp += [None] * len(qs)
    return Quantities(np.concatenate(cols, axis=1), names, group, method, comp, n_direct, circuit)


def reference_values(circuit: CircuitData | None) -> dict[str, float]:
    """circuit.json's value of each circuit quantity (empty without circuit.json)."""
    if circuit is None or circuit.reference is None:
        return {}
    ref = circuit.reference
    qs = CIRCUIT_QUANTITIES + (CURVE_QUANTITIES if circuit.curve is not None else ())
    return {f"circuit:{q}": float(getattr(ref, q)) for q in qs}


def check_reference(names: Sequence[str], estimate: np.ndarray, refs: Mapping[str, float], source: Any) -> None:
    """Step 4: the bootstrap's point estimates are circuit.json's numbers (else the files disagree)."""
    for name, est in zip(names, estimate):
        if name in refs and not abs(est - refs[name]) <= REFERENCE_RTOL * max(1.0, abs(refs[name])):
            raise DataError(f"{source}: {name.split(':', 1)[1]}={refs[name]!r} but the per-prompt circuit tables "
                            f"give {float(est)!r}; circuit.json and circuit_prompts/curve_prompts.parquet must come "
                            "from the same circuits run (re-run the circuits stage)")


def bootstrap_table(q: Quantities, res: BootstrapResult, refs: Mapping[str, float], seed: int) -> pl.DataFrame:
    """One row per quantity: estimate, SE, percentile and BCa bounds (null when not computed)."""
    p = len(q.names)

    def bounds(method: str, side: int) -> np.ndarray:
        return res.intervals[method][:, side] if method in res.intervals else np.full(p, np.nan)

    df = pl.DataFrame({
        "quantity": q.names, "group": q.group,
        "method": pl.Series(q.method, dtype=pl.String), "component": pl.Series(q.component, dtype=pl.String),
        "estimate": res.estimate, "se": res.standard_error,
        "percentile_lo": bounds("percentile", 0), "percentile_hi": bounds("percentile", 1),
        "bca_lo": bounds("bca", 0), "bca_hi": bounds("bca", 1),
        "reference": pl.Series([refs.get(n) for n in q.names], dtype=pl.Float64),
        "ci_level": np.full(p, res.ci_level), "n_prompts": np.full(p, res.n, dtype=np.int64),
        "B": np.full(p, res.B, dtype=np.int64), "seed": np.full(p, seed, dtype=np.int64),
    })
    return df.with_columns(pl.col(pl.Float64).fill_nan(None))


# ----------------------------------------------------------------------------- stability


def _pairwise_dict(res: PairwiseStability) -> dict[str, Any]:
    return {"names": res.names, "k": res.k, "tau_b": _nan_none(res.tau.tolist()),
            "jaccard_top_k": _nan_none(res.jaccard.tolist()),
            "tau_summary": _nan_none(res.tau_summary), "jaccard_summary": _nan_none(res.jaccard_summary)}


def _nan_none(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _nan_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_none(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


RANKINGS = {"signed": False, "abs": True}  # name -> by_abs


def stability_summary(scores: NodeScores, prompts: Prompts, cfg: StatsConfig, indices: np.ndarray) -> dict[str, Any]:
    """Step 5: tau-b and top-k Jaccard between methods, over resamples and across templates."""
    k, qs = cfg.top_k, cfg.quantiles
    out: dict[str, Any] = {"k": k, "n_prompts": len(prompts), "n_components": len(scores.components),
                           "methods": scores.methods, "B": int(indices.shape[0]), "seed": cfg.seed,
                           "rankings": {"signed": "by mean score", "abs": "by |mean score|"}}
    means = {m: scores.mean(m) for m in scores.methods}
    if len(scores.methods) >= 2:
        out["methods_pairwise"] = {r: _pairwise_dict(pairwise_stability(means, k=k, by_abs=b, quantiles=qs))
                                   for r, b in RANKINGS.items()}
    else:
        out["methods_pairwise"] = {"skipped": f"only one method ({scores.methods[0]}) in node_scores.parquet"}
    boot: dict[str, Any] = {}
    for m in scores.methods:
        boot[m] = {}
        for r, b in RANKINGS.items():
            st = bootstrap_rank_stability(scores.scores[m], k=k, by_abs=b, indices=indices, quantiles=qs)
            top = top_k_set(means[m], k, by_abs=b)
            boot[m][r] = {"tau_summary": _nan_none(st.tau_summary), "jaccard_summary": _nan_none(st.jaccard_summary),
                          "top_k_frequency": {scores.components[i]: float(st.selection_frequency[i]) for i in top}}
    out["bootstrap"] = boot
    out["templates"] = template_stability(scores, prompts, k, qs)
    return out


def template_stability(scores: NodeScores, prompts: Prompts, k: int, quantiles: Sequence[float]) -> dict[str, Any]:
    """Rank by mean score within each template (>= 2 prompts), compare all template pairs per method."""
    groups: dict[str, list[int]] = {}
    for row, t in enumerate(prompts.template):
        if t is not None:
            groups.setdefault(t, []).append(row)
    counts = {t: len(r) for t, r in sorted(groups.items())}
    used = {t: r for t, r in sorted(groups.items()) if len(r) >= 2}
    out: dict[str, Any] = {"n_prompts_per_template": counts, "templates": list(used)}
    if len(used) < 2:
        out["skipped"] = (f"{len(used)} template(s) with >= 2 prompts (prompts per template: {counts or 'none'}); "
                          "cross-template stability needs at least 2")
        return out
    out["by_method"] = {
        m: {r: _pairwise_dict(pairwise_stability({t: scores.scores[m][rows].mean(axis=0) for t, rows in used.items()},
                                                 k=k, by_abs=b, quantiles=quantiles))
            for r, b in RANKINGS.items()}
        for m in scores.methods}
    return out


def stability_methods_table(stab: dict[str, Any]) -> pl.DataFrame:
    """Long table (ranking, a, b, tau_b, jaccard_top_k, k) over method pairs a < b."""
    rows = []
    mp = stab["methods_pairwise"]
    for r in RANKINGS:
        if r not in mp:
            continue
        names = mp[r]["names"]
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                rows.append({"ranking": r, "a": names[i], "b": names[j], "tau_b": mp[r]["tau_b"][i][j],
                             "jaccard_top_k": mp[r]["jaccard_top_k"][i][j], "k": mp[r]["k"]})
    schema = {"ranking": pl.String, "a": pl.String, "b": pl.String, "tau_b": pl.Float64,
              "jaccard_top_k": pl.Float64, "k": pl.Int64}
    return pl.DataFrame(rows, schema=schema)


# ----------------------------------------------------------------------------- stage: one model


def run_statistics(
    cfg: StatsConfig | Mapping[str, Any],
    *,
    node_scores: Path,
    prompts: Path,
    model_card: Path,
    bootstrap: Path,
    bootstrap_csv: Path,
    stability: Path,
    stability_methods: Path,
    forest: Path,
    tau_heatmap: Path,
    summary: Path,
    circuit: Path | None = None,
    circuit_prompts: Path | None = None,
    curve_prompts: Path | None = None,
) -> dict[str, Any]:
    """Bootstrap CIs, ranking stability, figures and a summary for one model on one task.

    Args:
        cfg: the `stats` config group (`config/stats/default.yaml`; `StatsConfig` fields).
        node_scores, prompts: the circuits stage's per-prompt component scores and prompt table.
        model_card: `results/{run}/model_card.json`.
        bootstrap, bootstrap_csv, stability, stability_methods, forest, tau_heatmap, summary: the
            paths written (folders created): `bootstrap.parquet`/`.csv`, `stability.json`,
            `stability_methods.csv`, `forest.png`, `tau_heatmap.png`, `statistics.md`;
            `stats_outputs(folder)` gives these default names in one folder.
        circuit, circuit_prompts, curve_prompts: the circuit rule's circuit (edge or node circuit)
            and its per-prompt metrics (optional).

    Returns:
        Headline numbers (JSON-ready): n_prompts, B, seed, the task and circuit estimates with
        their intervals, the method-pair tau-b, and the written paths.
    """
    scfg = StatsConfig.from_dict(cfg)
    card = read_model_card(model_card)
    pr = read_prompts(prompts)
    ns = read_node_scores(node_scores, pr, card.n_layers)
    cd = read_circuit_data(pr, circuit, circuit_prompts, curve_prompts)
    if scfg.top_k > len(ns.components):
        raise ConfigError(f"stats.top_k: {scfg.top_k} is larger than the {len(ns.components)} components in "
                          f"{node_scores}; set it to at most {len(ns.components)}")
    shared = cd if cd is not None and cd.shared else None
    q = build_quantities(ns, pr, shared)
    indices = resample_indices(len(pr), scfg.B, scfg.seed)
    refs = reference_values(cd)
    table = _bootstrap_block(q, indices, scfg, refs, circuit, "prompts")
    if cd is not None and not cd.shared:
        qc = build_quantities(None, None, cd)
        table = pl.concat([table, _bootstrap_block(qc, resample_indices(len(cd), scfg.B, scfg.seed), scfg, refs,
                                                   circuit, "circuit_prompts")])
    stab = stability_summary(ns, pr, scfg, indices)
    outputs = {"bootstrap": bootstrap, "bootstrap_csv": bootstrap_csv, "stability": stability,
               "stability_methods": stability_methods, "forest": forest, "tau_heatmap": tau_heatmap,
               "summary": summary}
    return _write_statistics({k: Path(v) for k, v in outputs.items()}, scfg, card, ns, table, stab,
                             cd.unit if cd is not None else None)


def _bootstrap_block(q: Quantities, indices: np.ndarray, scfg: StatsConfig, refs: Mapping[str, float],
                     circuit: Path | None, resample_set: str) -> pl.DataFrame:
    """Bootstrap one prompt set's quantities on `indices` (steps 3-4) -> its rows of the table."""
    res = bootstrap_mean_functional(q.X, q.functional(), indices=indices, ci_level=scfg.ci_level,
                                    methods=scfg.ci_methods, seed=scfg.seed, names=q.names)
    check_reference(q.names, res.estimate, refs, circuit)
    return bootstrap_table(q, res, refs, scfg.seed).with_columns(pl.lit(resample_set).alias("resample_set"))


def _write_statistics(out: Mapping[str, Path], scfg: StatsConfig, card: ModelCard, ns: NodeScores,
                      table: pl.DataFrame, stab: dict[str, Any], circuit_unit: str | None = None) -> dict[str, Any]:
    """Write the `STATS_OUTPUTS` files to the paths in `out` (output name -> path), each atomically."""
    from mechflow.stats import report

    interval = "bca" if "bca" in scfg.ci_methods else "percentile"
    written = write_table_files(table, parquet=out["bootstrap"], csv=out["bootstrap_csv"], contract=BOOTSTRAP_SCHEMA)
    paths = {f"bootstrap.{ext}": p for ext, p in written.items()}
    paths["stability.json"] = write_document(out["stability"], StabilityDocument, stab)
    with atomic_path(out["stability_methods"]) as tmp:
        stability_methods_table(stab).write_csv(tmp)
    paths["stability_methods.csv"] = out["stability_methods"]
    paths["forest.png"] = report.forest_figure(table, ns, scfg.top_k, interval, out["forest"], model=card.name)
    paths["tau_heatmap.png"] = report.tau_heatmap(stab, out["tau_heatmap"])
    headline = report.headline_numbers(table, stab, interval)
    headline["circuit_unit"] = circuit_unit
    paths["statistics.md"] = atomic_write_text(out["summary"],
                                               report.statistics_markdown(card.name, table, stab, headline, interval))
    headline["outputs"] = {k: str(v) for k, v in paths.items()}
    logger.info("statistics for %s: %d quantities, B=%d, n=%d -> %s", card.name, table.height,
                scfg.B, int(table["n_prompts"][0]), out["summary"].parent)
    return headline


# ----------------------------------------------------------------------------- stage: two models


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


def _exact_components(ns: NodeScores, path: Path, n_layers: int, labels: np.ndarray) -> ModelComponents:
    if "exact" not in ns.methods:
        raise DataError(f"{path}: no rows with method 'exact'; FCAS uses exact-patching scores "
                        "(re-run the circuits stage with exact patching)")
    return ModelComponents(ns.mean("exact"), ns.layer, n_layers, labels, list(ns.components))


def run_cross_model(
    cfg: StatsConfig | Mapping[str, Any],
    *,
    node_scores_a: Path,
    node_scores_b: Path,
    model_card_a: Path,
    model_card_b: Path,
    head_types_a: Path | None,
    head_types_b: Path | None,
    prompts_a: Path,
    prompts_b: Path,
    fcas: Path,
    fcas_null: Path,
    summary: Path,
    cka: Path | None = None,
    cka_table: Path | None = None,
    cka_csv: Path | None = None,
    cka_figure: Path | None = None,
    dataset_a: Path | None = None,
    dataset_b: Path | None = None,
    model_cfg_a: dict | None = None,
    model_cfg_b: dict | None = None,
    activations: bool = True,
) -> dict[str, Any]:
    """FCAS (and linear CKA by depth) between two models on the same task.

    Args:
        cfg: the `stats` config group.
        node_scores_a/b, prompts_a/b, model_card_a/b: each model's circuits-stage tables and card.
        head_types_a/b: head labels (None or a missing file: every head is "head"; when only one
            model has labels both fall back to "head"/"mlp" so the labels stay comparable).
        fcas, fcas_null, summary: the paths written: `fcas.json`, `fcas_null.png`, `cross_model.md`.
        cka, cka_table, cka_csv, cka_figure: the CKA paths (`cka.json`, `cka.parquet`, `cka.csv`,
            `cka.png`), written only when CKA runs and then all required (None otherwise);
            `cross_model_outputs(folder)` gives every default name in one folder.
        dataset_a/b: each model's `tasks/{task}/dataset.jsonl` (prompt texts for CKA).
        model_cfg_a/b: model config dicts (`load_model_from_cfg`); CKA runs only when both are
            given and `activations` is true.

    Returns:
        Headline numbers: FCAS score, p-values, z, and (with CKA) the prompt count and the CKA
        matrix's diagonal-by-depth summary; plus the written paths.

    Raises:
        ConfigError: CKA runs and one of its four paths is None.
    """
    scfg = StatsConfig.from_dict(cfg)
    run_cka = activations and model_cfg_a is not None and model_cfg_b is not None
    outputs = {"fcas": fcas, "fcas_null": fcas_null, "summary": summary}
    cka_paths = {"cka": cka, "cka_table": cka_table, "cka_csv": cka_csv, "cka_figure": cka_figure}
    if run_cka:
        missing = [name for name, path in cka_paths.items() if path is None]
        if missing:
            raise ConfigError(f"run_cross_model: CKA runs (both model configs given) but no path for {missing}; "
                              "pass every CKA path (cross_model_outputs(folder)) or set activations=False")
        outputs.update(cka_paths)
    elif any(path is not None for path in cka_paths.values()):
        logger.info("run_cross_model: CKA does not run (activations=False or a model config missing); "
                    "the CKA paths are not written")
    card_a, card_b = read_model_card(model_card_a), read_model_card(model_card_b)
    ns_a = read_node_scores(node_scores_a, read_prompts(prompts_a), card_a.n_layers)
    ns_b = read_node_scores(node_scores_b, read_prompts(prompts_b), card_b.n_layers)
    lab_a, lab_b = read_head_labels(head_types_a, ns_a), read_head_labels(head_types_b, ns_b)
    if lab_a is not None and lab_b is not None:
        label_source = "head_types"
    else:
        if lab_a is not None or lab_b is not None:
            logger.warning("head types exist for only one model; FCAS uses the coarse labels head/mlp for both")
        label_source = "coarse (head/mlp): head_types missing for " + " and ".join(
            n for n, lab in ((card_a.name, lab_a), (card_b.name, lab_b)) if lab is None)
        lab_a, lab_b = coarse_labels(ns_a), coarse_labels(ns_b)
    comp_a = _exact_components(ns_a, node_scores_a, card_a.n_layers, lab_a)
    comp_b = _exact_components(ns_b, node_scores_b, card_b.n_layers, lab_b)
    k = scfg.top_k
    if k > min(len(comp_a), len(comp_b)):
        raise ConfigError(f"stats.top_k: {k} exceeds the number of components ({len(comp_a)} in {card_a.name}, "
                          f"{len(comp_b)} in {card_b.name}); set it to at most {min(len(comp_a), len(comp_b))}")
    cka_res = None
    if run_cka:
        if dataset_a is None or dataset_b is None:
            raise ConfigError("run_cross_model: CKA needs dataset_a and dataset_b (the two task datasets); "
                              "pass them or set activations=False")
        cka_prompts = cka_prompt_texts(dataset_a, dataset_b)
    fres = fcas_test(comp_a, comp_b, k, n_permutations=scfg.n_permutations, null=scfg.fcas_null, seed=scfg.seed)
    doc = fcas_document(fres, comp_a, comp_b, card_a, card_b, scfg, label_source)
    if run_cka:
        cka_res = representation_cka(model_cfg_a, model_cfg_b, card_a, card_b, dataset_a, dataset_b,
                                     cka_prompts.texts)
    return _write_cross_model({k: Path(v) for k, v in outputs.items()}, doc, fres, cka_res, card_a, card_b,
                              cka_prompts if run_cka else None)


FCAS_DEFINITION = (
    "FCAS = (1/k) max over one-to-one matchings of sum sim(a, b) between the top-k components (by |mean "
    "exact-patching score|) of each model; sim = (1 - |d_a - d_b|) [label_a == label_b] [sign_a == sign_b], "
    "d = (layer + 0.5) / n_layers (mechflow.stats.fcas)")


def fcas_document(res: FCASResult, a: ModelComponents, b: ModelComponents, card_a: ModelCard, card_b: ModelCard,
                  scfg: StatsConfig, label_source: str) -> dict[str, Any]:
    """fcas.json: definition, observed score, matching, null and p-values."""
    def side(mc: ModelComponents, i: int) -> dict[str, Any]:
        return {"component": mc.names[i], "layer": int(mc.layer[i]), "depth": float(mc.depth[i]),
                "label": str(mc.label[i]), "score": float(mc.attribution[i])}

    null = res.null
    return _nan_none({
        "definition": FCAS_DEFINITION, "attribution": "mean over prompts of the exact-patching score (signed)",
        "model_a": card_a.name, "model_b": card_b.name, "n_layers_a": card_a.n_layers, "n_layers_b": card_b.n_layers,
        "labels": label_source, "k": res.k, "score": res.score,
        "pairs": [{"a": side(a, i), "b": side(b, j), "similarity": s} for i, j, s in res.pairs],
        "null_kind": res.null_kind, "n_permutations": int(null.size), "seed": scfg.seed,
        "p_value": res.p_value, "p_value_randomized": res.p_value_randomized, "z": res.z,
        "null_mean": float(null.mean()), "null_std": float(null.std(ddof=1)) if null.size > 1 else None,
        "null_quantiles": {f"q{q:g}": float(np.quantile(null, q)) for q in scfg.quantiles},
    })


@dataclass(frozen=True)
class CKAPrompts:
    """The prompt texts both models read for CKA.

    Attributes:
        texts: A's unique prompt texts, then B's that A lacks (the union, deterministic order).
        n_a / n_b: unique prompt texts in each dataset; n_shared: texts in both.
    """

    texts: list[str]
    n_a: int
    n_b: int
    n_shared: int


def cka_prompt_texts(dataset_a: Path, dataset_b: Path) -> CKAPrompts:
    """The union of both task datasets' prompt texts (at least `MIN_CKA_PROMPTS`).

    Both models read every text, each tokenized with its own convention, so row i of both
    activation matrices is the same text. The union, not the intersection: task builders keep
    only names that are one token for the model's tokenizer, so with different tokenizers the
    same seed draws different prompts (IOI, 12 prompts: SmolLM2 and Gemma-3 share none).
    """
    from mechflow.tasks.dataset import TaskDataset

    ta = list(dict.fromkeys(it.prompt for it in TaskDataset.load(dataset_a).examples))
    tb = list(dict.fromkeys(it.prompt for it in TaskDataset.load(dataset_b).examples))
    in_a = set(ta)
    union = ta + [t for t in tb if t not in in_a]
    if len(union) < MIN_CKA_PROMPTS:
        raise DataError(f"{dataset_a} and {dataset_b} hold {len(union)} distinct prompt text(s) ({len(ta)} and "
                        f"{len(tb)}); CKA needs at least {MIN_CKA_PROMPTS}: raise the task's n_prompts")
    return CKAPrompts(union, len(ta), len(tb), sum(t in in_a for t in tb))


def last_token_residuals(loaded: Any, token_ids: Sequence[Sequence[int]],
                         batch_size: int = 32) -> dict[int, np.ndarray]:
    """layer -> [n_prompts, d_model] float64 `blocks.{l}.hook_resid_post` at each prompt's last token.

    Prompts of equal length are batched together (no padding, so the last position is the last token).
    """
    import torch

    model = loaded.model
    n_layers = model.cfg.n_layers
    out = {l: np.empty((len(token_ids), model.cfg.d_model)) for l in range(n_layers)}
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(token_ids):
        by_len.setdefault(len(ids), []).append(i)
    for rows_all in by_len.values():
        for s in range(0, len(rows_all), batch_size):
            rows = rows_all[s:s + batch_size]
            store: dict[int, Any] = {}

            def keep(act, hook, store=store):
                store[int(hook.name.split(".")[1])] = act[:, -1].detach().to(torch.float64).cpu().numpy()

            tokens = torch.tensor([list(token_ids[i]) for i in rows], device=model.cfg.device)
            with torch.inference_mode():
                # stop after the last block: the unembedding (Gemma: 262k vocab) is not needed
                model.run_with_hooks(tokens, stop_at_layer=n_layers,
                                     fwd_hooks=[(lambda name: name.endswith("hook_resid_post"), keep)])
            for l in range(n_layers):
                out[l][rows] = store[l]
    return out


def representation_cka(model_cfg_a: dict, model_cfg_b: dict, card_a: ModelCard, card_b: ModelCard,
                       dataset_a: Path, dataset_b: Path, texts: Sequence[str]) -> DepthCKA:
    """Linear CKA by depth between the two models' last-token residual streams on `texts`.

    Each text is tokenized with the model's own BOS convention (`mechflow.models.encode`, the
    tokenization the task datasets use); for the texts of the model's own dataset the ids must
    equal the dataset's `clean_ids`, else the dataset was prepared for another model/convention.
    """
    from mechflow.models import encode, load_model_from_cfg
    from mechflow.tasks.dataset import TaskDataset

    acts = []
    for mcfg, card, ds_path in ((model_cfg_a, card_a, dataset_a), (model_cfg_b, card_b, dataset_b)):
        loaded = load_model_from_cfg(mcfg)
        if loaded.card.name != card.name or loaded.card.n_layers != card.n_layers:
            raise ConfigError(f"model config {mcfg.get('name')!r} loads {loaded.card.name} but the model card says "
                              f"{card.name}; pass the model config of the run that produced the scores")
        ids = [encode(loaded.tokenizer, t, loaded.card.prepend_bos, loaded.card.bos_token_id) for t in texts]
        own = {it.prompt: it.clean_ids for it in TaskDataset.load(ds_path).examples}
        for t, row in zip(texts, ids):
            if t in own and own[t] != row:
                raise DataError(f"{ds_path}: clean_ids of {t!r} differ from {card.name}'s tokenization with its BOS "
                                "convention; pass each model's own dataset (or re-run prepare_task)")
        acts.append(last_token_residuals(loaded, ids))
    return cka_by_depth(acts[0], acts[1], n_layers_a=card_a.n_layers, n_layers_b=card_b.n_layers, n_shuffles=20)


def _write_cross_model(out: Mapping[str, Path], doc: dict[str, Any], fres: FCASResult, cka_res: DepthCKA | None,
                       card_a: ModelCard, card_b: ModelCard, cka_prompts: CKAPrompts | None) -> dict[str, Any]:
    """Write the cross-model files to the paths in `out` (output name -> path; the CKA ones when
    `cka_res` is given), each atomically."""
    from mechflow.stats import report

    paths: dict[str, Path] = {}
    cka_doc = None
    if cka_res is not None:
        cp = summarize_cka(cka_res, model_a=card_a.name, model_b=card_b.name, parquet=out["cka_table"],
                           csv=out["cka_csv"], heatmap=out["cka_figure"])
        paths.update({"cka.parquet": cp["parquet"], "cka.csv": cp["csv"], "cka.png": cp["heatmap"]})
        cka_doc = report.cka_headline(cka_res, cka_prompts, card_a.name, card_b.name)
        paths["cka.json"] = write_document(out["cka"], CkaDocument, cka_doc)
    paths["fcas.json"] = write_document(out["fcas"], FcasDocument, doc)
    paths["fcas_null.png"] = null_histogram(fres.null, fres.score, out["fcas_null"],
                                            title=f"FCAS {card_a.name} vs {card_b.name} (k={fres.k}) vs "
                                                  f"{fres.null_kind} null", p_value=fres.p_value)
    paths["cross_model.md"] = atomic_write_text(out["summary"], report.cross_model_markdown(doc, cka_doc))
    headline = {"model_a": card_a.name, "model_b": card_b.name, "fcas": doc["score"], "k": doc["k"],
                "p_value": doc["p_value"], "z": doc["z"], "null_kind": doc["null_kind"], "cka": cka_doc,
                "outputs": {k: str(v) for k, v in paths.items()}}
    logger.info("cross-model %s vs %s: FCAS %.3f (p=%.3g)", card_a.name, card_b.name, doc["score"], doc["p_value"])
    return headline
