"""Statistics stages: circuits-stage tables -> confidence intervals, ranking stability, cross-model alignment.

`stats` (rule `stats`; one model, one task), after Efron & Tibshirani (1993) for the bootstrap and
MIB (Mueller et al. 2025) for the circuit quantities:
    1. Read and check the circuits-stage tables (`node_scores.parquet`, `prompts.parquet`, and
       the circuit rule's `circuit.json`, `circuit_prompts.parquet`, `curve_prompts.parquet`
       (an edge circuit, or a node circuit on models without edge patching such as Gemma-3);
       every problem is one `DataError` naming the file and column (`mechflow.stats.readers`).
    2. Stack every per-prompt quantity into one matrix X [n_prompts, q]: each method's score of
       each component, the clean and corrupted task metric, m(N), m(empty), m(C), m(N minus C)
       and the metric at every curve budget (`mechflow.stats.quantities`).
    3. Draw the prompt resample indices ONCE ([B, n], `stats.seed`) and bootstrap every
       statistic from them (`bootstrap_mean_functional`): plain means, faithfulness as a ratio
       of means, comprehensiveness, F1, and CPR/CMD with the circuits stage's own
       `area_metrics` applied to each resample. All CIs therefore describe the same resamples.
    4. Check that the point estimates of the circuit quantities equal the numbers in
       circuit.json (the two files must come from the same circuits run).
    5. Ranking stability (Kendall tau-b, top-k Jaccard): between methods, across bootstrap
       resamples (the same indices), across prompt templates (`mechflow.stats.rankings`).
    6. Write bootstrap.parquet/.csv, stability.json, stability_methods.csv, forest.png,
       tau_heatmap.png and statistics.md, each atomically, after every input has been checked, to
       exactly the paths the caller names (the rule's outputs; `stats_outputs(folder)` gives the
       default file names in one folder).

`cross_model` (rule `cross_model`; two models, the same task): FCAS between the exact-patching
component scores with its sampled permutation null (`fcas.py`), and linear CKA by relative depth
between the residual streams at the last prompt token (Kornblith et al. 2019) on the union of both
task datasets' prompt texts, each model reading every text with its own tokenization
(`mechflow.stats.alignment`). It writes exactly the paths the caller names
(`cross_model_outputs(folder)`: the default file names).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import polars as pl

from mechflow.contracts.documents import write_document
from mechflow.contracts.models import ModelCard
from mechflow.contracts.parquet import BOOTSTRAP_SCHEMA
from mechflow.contracts.stats import CkaDocument, FcasDocument, StabilityDocument
from mechflow.errors import ConfigError
from mechflow.io import atomic_path, atomic_write_text, outputs_in
from mechflow.stats.alignment import (
    CKAPrompts,
    cka_prompt_texts,
    exact_components,
    fcas_document,
    representation_cka,
)
from mechflow.stats.bootstrap import bootstrap_mean_functional, resample_indices
from mechflow.stats.checks import check_top_k
from mechflow.stats.cka import DepthCKA
from mechflow.stats.config import StatsConfig
from mechflow.stats.fcas import FCASResult, fcas_test
from mechflow.stats.output import null_histogram, summarize_cka, write_table_files
from mechflow.stats.quantities import Quantities, bootstrap_table, build_quantities, check_reference, reference_values
from mechflow.stats.rankings import stability_methods_table, stability_summary
from mechflow.stats.readers import (
    NodeScores,
    coarse_labels,
    read_circuit_data,
    read_head_labels,
    read_model_card,
    read_node_scores,
    read_prompts,
)

logger = logging.getLogger(__name__)

# Output name (the rule's `output:` name, the stage function's keyword) -> default file name.
STATS_OUTPUTS = {"bootstrap": "bootstrap.parquet", "bootstrap_csv": "bootstrap.csv", "stability": "stability.json",
                 "stability_methods": "stability_methods.csv", "forest": "forest.png",
                 "tau_heatmap": "tau_heatmap.png", "summary": "statistics.md"}
CROSS_MODEL_OUTPUTS = {"fcas": "fcas.json", "fcas_null": "fcas_null.png", "summary": "cross_model.md"}
CKA_OUTPUTS = {"cka": "cka.json", "cka_table": "cka.parquet", "cka_csv": "cka.csv", "cka_figure": "cka.png"}


def stats_outputs(folder: str | Path) -> dict[str, Path]:
    """`stats`' output paths with their default file names in `folder` (library and test
    callers: ``stats(cfg, **inputs, **stats_outputs(folder))``)."""
    return outputs_in(folder, STATS_OUTPUTS)


def cross_model_outputs(folder: str | Path, *, cka: bool = True) -> dict[str, Path]:
    """`cross_model`'s output paths with their default file names in `folder`; with ``cka=False``
    without the four CKA files (for a caller that runs without activations)."""
    return outputs_in(folder, {**CROSS_MODEL_OUTPUTS, **(CKA_OUTPUTS if cka else {})})


def stats(
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
    # the ranking functions check top_k against the components too, but only after the bootstrap
    check_top_k("stats.top_k", scfg.top_k, len(ns.components))
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


def cross_model(
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
            raise ConfigError(f"cross_model: CKA runs (both model configs given) but no path for {missing}; "
                              "pass every CKA path (cross_model_outputs(folder)) or set activations=False")
        outputs.update(cka_paths)
    elif any(path is not None for path in cka_paths.values()):
        logger.info("cross_model: CKA does not run (activations=False or a model config missing); "
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
    comp_a = exact_components(ns_a, node_scores_a, card_a.n_layers, lab_a)
    comp_b = exact_components(ns_b, node_scores_b, card_b.n_layers, lab_b)
    k = scfg.top_k  # fcas_test checks it against both models' components before CKA loads them
    cka_res = None
    if run_cka:
        if dataset_a is None or dataset_b is None:
            raise ConfigError("cross_model: CKA needs dataset_a and dataset_b (the two task datasets); "
                              "pass them or set activations=False")
        cka_prompts = cka_prompt_texts(dataset_a, dataset_b)
    fres = fcas_test(comp_a, comp_b, k, n_permutations=scfg.n_permutations, null=scfg.fcas_null, seed=scfg.seed)
    doc = fcas_document(fres, comp_a, comp_b, card_a, card_b, scfg, label_source)
    if run_cka:
        cka_res = representation_cka(model_cfg_a, model_cfg_b, card_a, card_b, dataset_a, dataset_b,
                                     cka_prompts.texts)
    return _write_cross_model({k: Path(v) for k, v in outputs.items()}, doc, fres, cka_res, card_a, card_b,
                              cka_prompts if run_cka else None)


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
