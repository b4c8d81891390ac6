"""Summarize a run: one CSV table and one figure (activation-norm distributions per hook).

Every number in the table is read from, or recomputed from, a result file of the run; the
`source` column names that file so a reader can check it. Every JSON file is read through its
contract (`mechflow.contracts`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from mechflow.contracts.attribution import Agreement  # noqa: E402
from mechflow.contracts.circuits import CircuitFile  # noqa: E402
from mechflow.contracts.dictionaries import TranscoderMetrics  # noqa: E402
from mechflow.contracts.documents import load_document, read_document  # noqa: E402
from mechflow.contracts.harvest import HarvestIndex, HarvestManifest  # noqa: E402
from mechflow.contracts.models import ModelCard  # noqa: E402
from mechflow.contracts.tasks import TaskBaseline  # noqa: E402
from mechflow.io import atomic_path  # noqa: E402
from mechflow.plotting import save_figure
from mechflow.summary.config import SummaryConfig

log = logging.getLogger(__name__)

TABLE_COLUMNS = ["kind", "name", "quantity", "value", "source"]


def _task_rows(baseline_path: Path) -> list[dict]:
    data = load_document(baseline_path, TaskBaseline, fix="re-run the evaluate_task stage")
    name = data.get("task", baseline_path.parent.name)
    rows = []
    for key in ("n_prompts", "clean_metric_mean", "corrupted_metric_mean", "accuracy", "chance_accuracy"):
        if key in data and data[key] is not None:
            rows.append({"kind": "task", "name": name, "quantity": key, "value": str(data[key]),
                         "source": str(baseline_path)})
    rows.append({"kind": "task", "name": name, "quantity": "verdict", "value": str(data.get("verdict", "")),
                 "source": str(baseline_path)})
    return rows


def _activation_norms(manifest_path: Path, manifest: HarvestManifest, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Norms of up to `limit` rows (lazy scan: only those rows are read) and their positions."""
    files = [str(manifest_path.parent / s.file) for s in manifest.shards]
    frame = pl.scan_parquet(files).select("position", "activation").head(limit).collect()
    acts = np.asarray(frame["activation"].to_list(), dtype=np.float32) if manifest.dtype != "bfloat16" else None
    if acts is None:  # bfloat16 is stored as uint16 upper halves (see contracts.parquet)
        raw = np.asarray(frame["activation"].to_list(), dtype=np.uint16).astype(np.uint32) << 16
        acts = raw.view(np.float32)
    return np.linalg.norm(acts, axis=1), frame["position"].to_numpy()


CIRCUIT_QUANTITIES = ("unit", "n_units", "n_units_total", "n_edges", "n_edges_total", "faithfulness", "sufficiency",
                      "comprehensiveness", "f1", "cpr", "cmd",
                      "m_full", "m_empty", "m_circuit")
DICTIONARY_QUANTITIES = ("explained_variance", "explained_variance_with_outliers", "fvu", "l0", "dead_fraction",
                         "dense_fraction", "ce_clean", "ce_spliced", "ce_increase", "ce_recovered_zero",
                         "ce_recovered_mean", "kl_spliced")


def _json_rows(kind: str, name: str, path: Path, keys: tuple[str, ...], model) -> list[dict]:
    data = load_document(path, model, fix=f"re-run the stage that writes {Path(path).name}")
    return [{"kind": kind, "name": name, "quantity": k, "value": str(data[k]), "source": str(path)}
            for k in keys if data.get(k) is not None]


def _result_rows(paths: list[Path]) -> list[dict]:
    """Headline numbers of circuit.json / agreement.json / *_metrics.json files, by file name."""
    rows = []
    for path in map(Path, paths):
        if path.name == "circuit.json":
            rows += _json_rows("circuit", path.parent.name, path, CIRCUIT_QUANTITIES, CircuitFile)
        elif path.name == "agreement.json":
            data = load_document(path, Agreement, fix="re-run the attribute rule")
            rows += [{"kind": "attribution", "name": path.parent.name, "quantity": f"{m}_{k}", "value": str(v),
                      "source": str(path)} for m in ("ap", "ig") for k, v in data.get(m, {}).items()]
        elif path.name.endswith("_metrics.json"):
            rows += _json_rows("dictionary", path.name.removesuffix("_metrics.json"), path, DICTIONARY_QUANTITIES,
                               TranscoderMetrics)
    return rows


def summarize(cfg: SummaryConfig | Mapping[str, Any], *, baselines: list[Path], harvest_index: Path, model_card: Path,
              table: Path, figure: Path, results: list[Path] = ()) -> pl.DataFrame:
    """Write `table` (CSV: kind, name, quantity, value, source) and `figure` (PNG).

    `results` are later stages' JSON files (circuit.json, agreement.json, *_metrics.json) whose
    headline numbers join the table.
    """
    scfg = SummaryConfig.from_dict(cfg)
    rows: list[dict] = []
    card = read_document(model_card, ModelCard, fix="re-run the model_card rule")
    for key in ("name", "n_layers", "d_model", "source_sha256"):
        rows.append({"kind": "model", "name": card.name, "quantity": key, "value": str(getattr(card, key)),
                     "source": str(model_card)})
    for path in baselines:
        rows.extend(_task_rows(Path(path)))

    index = read_document(harvest_index, HarvestIndex, fix="re-run the harvest stage")
    hooks = index.hooks
    fig, axes = plt.subplots(1, max(1, len(hooks)), figsize=(5 * max(1, len(hooks)), 3.6), squeeze=False)
    for ax, entry in zip(axes[0], hooks):
        manifest_path = Path(harvest_index).parent / entry.manifest
        manifest = HarvestManifest.model_validate_json(manifest_path.read_text())
        norms, positions = _activation_norms(manifest_path, manifest, scfg.norm_sample_rows)
        first = positions == 0
        rest = norms[~first] if (~first).any() else norms
        for quantity, value in [("n_rows", manifest.n_rows), ("n_shards", len(manifest.shards)), ("d", manifest.d),
                                ("median_norm_non_first", float(np.median(rest))),
                                ("median_norm_position0", float(np.median(norms[first])) if first.any() else None)]:
            if value is not None:
                rows.append({"kind": "harvest", "name": manifest.hook, "quantity": quantity, "value": str(value),
                             "source": str(manifest_path)})
        bins = np.logspace(np.log10(max(rest.min(), 1e-3)), np.log10(max(norms.max(), rest.min() * 10)), 60)
        ax.hist(rest, bins=bins, color="tab:blue", alpha=0.8, label="positions ≥ 1")
        if first.any():
            ax.hist(norms[first], bins=bins, color="tab:red", alpha=0.8, label="position 0 (BOS)")
        ax.set_xscale("log")
        ax.set_title(f"{manifest.model}: {manifest.hook}", fontsize=9)
        ax.set_xlabel("activation L2 norm (log scale)")
        ax.set_ylabel(f"count (first {len(norms)} rows)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, figure, dpi=scfg.figure_dpi)
    plt.close(fig)

    rows.extend(_result_rows(list(results)))
    frame = pl.DataFrame(rows, schema={c: pl.Utf8 for c in TABLE_COLUMNS})
    with atomic_path(table) as tmp:
        frame.write_csv(tmp)
    log.info("summary: %d rows -> %s", frame.height, table)
    return frame
