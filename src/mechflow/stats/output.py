"""Write statistics results: tables (Parquet + CSV), JSON summaries and figures, atomically.

Every file goes through `mechflow.io.atomic_path`, so a killed job leaves no half-written file.
Figures use matplotlib's object API with the Agg canvas (no global backend switch, no display).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mechflow.contracts.parquet import CKA_SCHEMA, check_schema
from mechflow.errors import DataError
from mechflow.io import atomic_path, atomic_write_json
from mechflow.plotting import save_figure
from mechflow.stats.bootstrap import BootstrapResult
from mechflow.stats.cka import DepthCKA
from mechflow.stats.fcas import FCASResult, ModelComponents
from mechflow.stats.stability import BootstrapStability, PairwiseStability

logger = logging.getLogger(__name__)


def _none_if_nan(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _none_if_nan(v) for k, v in x.items()}
    if isinstance(x, (float, np.floating)) and not np.isfinite(x):
        return None
    return x


def nan_to_none(x: Any) -> Any:
    """A JSON-ready copy of `x` for the stage's documents: NaN/inf become None, numpy scalars
    Python numbers, through nested dicts, lists and tuples (tuples become lists)."""
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [nan_to_none(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_table(df: pl.DataFrame, out_dir: str | Path, stem: str, contract: pa.Schema | None = None
                ) -> dict[str, Path]:
    """Write `df` as `{stem}.parquet` and `{stem}.csv` in `out_dir`, each atomically (checked
    against `contract` first, when given: `mechflow.contracts.parquet`)."""
    out_dir = Path(out_dir)
    return write_table_files(df, parquet=out_dir / f"{stem}.parquet", csv=out_dir / f"{stem}.csv", contract=contract)


def write_table_files(df: pl.DataFrame, *, parquet: str | Path, csv: str | Path, contract: pa.Schema | None = None
                      ) -> dict[str, Path]:
    """Write `df` to exactly the paths `parquet` and `csv`, each atomically (checked against
    `contract` first, when given: `mechflow.contracts.parquet`)."""
    paths = {"parquet": Path(parquet), "csv": Path(csv)}
    if contract is not None:
        check_schema(df.head(0).to_arrow().schema, contract, paths["parquet"].name)
    with atomic_path(paths["parquet"]) as tmp:
        df.write_parquet(tmp)
    with atomic_path(paths["csv"]) as tmp:
        df.write_csv(tmp)
    return paths


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    save_figure(fig, path, dpi=150, bbox_inches="tight")
    return path


def bootstrap_table(result: BootstrapResult, names: Sequence[str] | None = None) -> pl.DataFrame:
    """One row per statistic: estimate, SE, each interval's bounds, z0, acceleration, B, n."""
    p = result.estimate.size
    names = list(names if names is not None else (result.names or [str(i) for i in range(p)]))
    if len(names) != p:
        raise DataError(f"bootstrap table: {len(names)} names for {p} statistics")
    cols: dict[str, Any] = {"name": names, "estimate": result.estimate, "se": result.standard_error}
    for method, iv in result.intervals.items():
        cols[f"{method}_low"] = iv[:, 0]
        cols[f"{method}_high"] = iv[:, 1]
    cols.update({"z0": result.z0, "acceleration": result.acceleration,
                 "ci_level": np.full(p, result.ci_level), "B": np.full(p, result.B, dtype=np.int64),
                 "n": np.full(p, result.n, dtype=np.int64)})
    return pl.DataFrame(cols).with_columns(pl.col(pl.Float64).fill_nan(None))


def forest_plot(names: Sequence[str], estimate: np.ndarray, interval: np.ndarray, path: str | Path,
                *, title: str = "", xlabel: str = "estimate", max_rows: int = 60) -> Path:
    """Point estimates with horizontal CI bars; keeps the `max_rows` largest |estimate|."""
    est = np.asarray(estimate, dtype=float)
    order = np.argsort(-np.abs(est), kind="stable")[:max_rows][::-1]
    fig = Figure(figsize=(6, 0.25 * len(order) + 1.2))
    ax = fig.add_subplot()
    y = np.arange(len(order))
    lo, hi = interval[order, 0], interval[order, 1]
    ok = np.isfinite(lo) & np.isfinite(hi)
    ax.errorbar(est[order][ok], y[ok], xerr=[est[order][ok] - lo[ok], hi[ok] - est[order][ok]],
                fmt="o", ms=3, capsize=2, color="tab:blue")
    ax.plot(est[order][~ok], y[~ok], "x", color="tab:red", label="interval undefined" if (~ok).any() else None)
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(y, [str(names[i]) for i in order], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    if (~ok).any():
        ax.legend(fontsize=7)
    return _save(fig, Path(path))


def matrix_heatmap(row_names: Sequence[str], col_names: Sequence[str], matrix: np.ndarray, path: str | Path,
                   *, title: str = "", vmin: float = -1.0, vmax: float = 1.0, cmap: str = "RdBu_r",
                   label: str = "Kendall tau-b") -> Path:
    """Annotated heat map (tau matrix, Jaccard matrix, CKA by depth)."""
    m = np.asarray(matrix, dtype=float)
    fig = Figure(figsize=(max(4.5, 1.8 + 0.5 * m.shape[1]), max(3.0, 1.0 + 0.45 * m.shape[0])))
    ax = fig.add_subplot()
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(m.shape[1]), list(map(str, col_names)), rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(m.shape[0]), list(map(str, row_names)), fontsize=7)
    if m.size <= 400:
        for (i, j), v in np.ndenumerate(m):
            # white text on dark cells (by the cell colour's luminance), so every value stays legible
            r, g, b_, _ = im.cmap(im.norm(v)) if np.isfinite(v) else (1, 1, 1, 1)
            dark = 0.299 * r + 0.587 * g + 0.114 * b_ < 0.5
            ax.text(j, i, "nan" if not np.isfinite(v) else f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if dark else "black")
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title, fontsize=9)
    return _save(fig, Path(path))


def null_histogram(null: np.ndarray, observed: float, path: str | Path, *, title: str = "",
                   xlabel: str = "FCAS", p_value: float | None = None) -> Path:
    """Histogram of the sampled null with the observed value marked."""
    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    ax.hist(np.asarray(null, dtype=float), bins=40, color="lightgrey", edgecolor="grey")
    lab = f"observed {observed:.3f}" + (f" (p={p_value:.3g})" if p_value is not None else "")
    ax.axvline(observed, color="tab:red", lw=2, label=lab)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("null draws")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(fig, Path(path))


def summarize_bootstrap(result: BootstrapResult, out_dir: str | Path, *, names: Sequence[str] | None = None,
                        stem: str = "bootstrap", plot_method: str | None = "bca", title: str = "",
                        xlabel: str = "estimate") -> dict[str, Path]:
    """Write `{stem}.parquet/.csv` (one row per statistic), `{stem}.json` and `{stem}_forest.png`.

    Args:
        result: from `bootstrap_means` / `bootstrap_faithfulness` / `bootstrap`.
        out_dir: destination folder (created).
        names: statistic labels (default: `result.names`, else indices).
        plot_method: interval drawn in the forest plot (None: no figure; falls back to
            "percentile" if the method was not computed).
    """
    out_dir = Path(out_dir)
    df = bootstrap_table(result, names)
    paths = write_table(df, out_dir, stem)
    meta = {"B": result.B, "n": result.n, "ci_level": result.ci_level, "seed": result.seed,
            "methods": sorted(result.intervals), "statistics": _none_if_nan_rows(df.to_dicts())}
    paths["json"] = atomic_write_json(out_dir / f"{stem}.json", meta)
    if plot_method is not None:
        method = plot_method if plot_method in result.intervals else sorted(result.intervals)[-1]
        paths["forest"] = forest_plot(df["name"].to_list(), result.estimate, result.ci(method),
                                      out_dir / f"{stem}_forest.png",
                                      title=title or (f"{result.ci_level:.0%} {method} intervals "
                                                      f"(B={result.B}, n={result.n})"),
                                      xlabel=xlabel)
    return paths


def _none_if_nan_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [_none_if_nan(r) for r in rows]


def summarize_pairwise_stability(res: PairwiseStability, out_dir: str | Path, *, stem: str = "stability",
                                 title: str = "") -> dict[str, Path]:
    """Long table (a, b, tau_b, jaccard) for all ordered pairs, JSON summary, tau heat map."""
    out_dir = Path(out_dir)
    m = len(res.names)
    df = pl.DataFrame({
        "a": [res.names[i] for i in range(m) for _ in range(m)],
        "b": [res.names[j] for _ in range(m) for j in range(m)],
        "tau_b": res.tau.ravel(), "jaccard_top_k": res.jaccard.ravel(), "k": np.full(m * m, res.k),
    }).with_columns(pl.col(pl.Float64).fill_nan(None))
    paths = write_table(df, out_dir, stem)
    paths["json"] = atomic_write_json(out_dir / f"{stem}.json", {
        "names": res.names, "k": res.k, "tau_summary": _none_if_nan(res.tau_summary),
        "jaccard_summary": _none_if_nan(res.jaccard_summary)})
    paths["heatmap"] = matrix_heatmap(res.names, res.names, res.tau, out_dir / f"{stem}_tau.png",
                                      title=title or "Kendall tau-b between rankings")
    return paths


def summarize_bootstrap_stability(res: BootstrapStability, out_dir: str | Path, *,
                                  component_names: Sequence[str] | None = None,
                                  stem: str = "bootstrap_stability") -> dict[str, Path]:
    """Per-component top-k selection frequency table and a JSON with tau / Jaccard summaries."""
    out_dir = Path(out_dir)
    p = res.selection_frequency.size
    names = list(component_names) if component_names is not None else [str(i) for i in range(p)]
    df = pl.DataFrame({"component": names, "top_k_frequency": res.selection_frequency})
    paths = write_table(df, out_dir, stem)
    paths["json"] = atomic_write_json(out_dir / f"{stem}.json", {
        "k": res.k, "B": int(res.tau.size), "tau_summary": _none_if_nan(res.tau_summary),
        "jaccard_summary": _none_if_nan(res.jaccard_summary)})
    return paths


def summarize_fcas(res: FCASResult, out_dir: str | Path, *, a: ModelComponents | None = None,
                   b: ModelComponents | None = None, stem: str = "fcas", title: str = "") -> dict[str, Path]:
    """`{stem}.json` (score, p-values, z, matching) and `{stem}_null.png` (null histogram)."""
    out_dir = Path(out_dir)
    paths = {"json": atomic_write_json(out_dir / f"{stem}.json", res.to_dict(a, b))}
    if res.null.size:
        paths["histogram"] = null_histogram(res.null, res.score, out_dir / f"{stem}_null.png",
                                            title=title or f"FCAS (k={res.k}) vs {res.null_kind} null",
                                            p_value=res.p_value)
    return paths


def summarize_cka(res: DepthCKA, out_dir: str | Path | None = None, *, stem: str = "cka", model_a: str = "A",
                  model_b: str = "B", parquet: str | Path | None = None, csv: str | Path | None = None,
                  heatmap: str | Path | None = None) -> dict[str, Path]:
    """Long CKA table (layer_a, layer_b, depths, cka) and a by-depth heat map.

    Written to `parquet`, `csv` and `heatmap` when given, else to `{stem}.parquet`, `{stem}.csv`
    and `{stem}.png` in `out_dir` (needed only for a path not given).
    """
    if out_dir is None and None in (parquet, csv, heatmap):
        raise TypeError("summarize_cka: give out_dir or all of parquet, csv and heatmap")
    folder = Path(out_dir) if out_dir is not None else Path()
    parquet = Path(parquet) if parquet is not None else folder / f"{stem}.parquet"
    csv = Path(csv) if csv is not None else folder / f"{stem}.csv"
    heatmap = Path(heatmap) if heatmap is not None else folder / f"{stem}.png"
    la, lb = res.layers_a, res.layers_b
    df = pl.DataFrame({
        "layer_a": np.repeat(la, len(lb)), "layer_b": np.tile(lb, len(la)),
        "depth_a": np.repeat(res.depth_a, len(lb)), "depth_b": np.tile(res.depth_b, len(la)),
        "cka": res.matrix.ravel(),
        "cka_debiased": (res.debiased if res.debiased is not None else np.full_like(res.matrix, np.nan)).ravel()})
    paths = write_table_files(df, parquet=parquet, csv=csv, contract=CKA_SCHEMA)
    shown, what = (res.debiased, "debiased linear CKA") if res.debiased is not None else (res.matrix, "linear CKA")
    paths["heatmap"] = matrix_heatmap([f"{model_a} L{l}" for l in la], [f"{model_b} L{l}" for l in lb],
                                      shown, heatmap, vmin=0.0, vmax=1.0,
                                      cmap="viridis", label=what, title=f"{what} by layer")
    return paths
