"""The measured evidence blocks of the report, read from the run's result files through their contracts.

Each ``measured`` key of `mechflow.report.annex_iv.POINTS` is one method ``block_<key>`` of
`Collector`; it reads only files that ``run_manifest.json`` records (so the set of results a report
covers is exactly the run's), records every number in the `Ledger`, and returns `Block`s whose
cells and paragraphs cite numbers as ``{N:<id>}`` (the renderers print the value and its evidence).
Thresholds of `ReportConfig` turn findings into `Limitation`s; nothing here grades compliance.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from mechflow.contracts.attribution import Agreement  # noqa: F401  (the attribution contract, for readers)
from mechflow.contracts.audit import AuditSummary, EstimateDoc
from mechflow.contracts.circuits import CircuitFile
from mechflow.contracts.dictionaries import DictionaryMetrics, TranscoderSetDocument, TranscoderStackMetrics
from mechflow.contracts.documents import load_document, read_document
from mechflow.contracts.graphs import GraphSummary
from mechflow.contracts.models import ModelCard, RunManifest
from mechflow.contracts.reference import AucDocument
from mechflow.contracts.report import Block, Limitation
from mechflow.contracts.stats import CkaDocument, FcasDocument, StabilityDocument
from mechflow.contracts.steer import SteerSummary
from mechflow.contracts.tasks import TaskBaseline
from mechflow.report.config import ReportConfig
from mechflow.report.evidence import Ledger

FIX = "re-run the stage that writes it"


def N(id: str) -> str:  # noqa: N802 (a citation token, read as "number")
    """The token a renderer replaces with the number's value and its evidence id."""
    return "{N:" + id + "}"


def text(s: str) -> Block:
    return Block(kind="text", text=s)


class Collector:
    """Builds the measured blocks of one run from its manifest-recorded files."""

    def __init__(self, cfg: ReportConfig, ledger: Ledger, run_dir: Path, manifest: RunManifest, manifest_path: Path,
                 run: str, paper_figures: dict[str, Path] | None = None):
        self.cfg, self.ledger, self.run_dir, self.manifest, self.run = cfg, ledger, Path(run_dir), manifest, run
        self.paper_figures = {k: str(v) for k, v in (paper_figures or {}).items()}
        self.manifest_path = str(manifest_path)
        self.files = sorted(set(manifest.inputs) | set(manifest.outputs))
        self.limitations: list[Limitation] = []
        self._done: set[str] = set()

    # ------------------------------------------------------------------ helpers

    def recorded(self, pattern: str) -> list[str]:
        """Manifest-recorded files matching `pattern` (relative to the run folder, fnmatch syntax)."""
        full = f"{self.run_dir}/{pattern}"
        return [f for f in self.files if fnmatch.fnmatch(f, full)]

    def one(self, rel: str) -> str | None:
        hits = self.recorded(rel)
        return hits[0] if hits else None

    def tasks(self) -> list[str]:
        return sorted(Path(p).parent.name for p in self.recorded("tasks/*/baseline.json"))

    def num(self, id: str, label: str, value: Any, path: str, field: str) -> str:
        """Record a number once (a second mention of the same id, e.g. a task's prompt count in 2(d) and
        2(g), reuses the first entry) and return its id."""
        if id not in self.ledger.numbers:
            self.ledger.number(id, label, value, path, field)
        return id

    def limit(self, number: str, key: str, threshold: Any, message: str) -> None:
        self.limitations.append(Limitation(number=number, threshold_key=key, threshold=threshold, text=message))

    def check(self, number: str, key: str, what: str) -> None:
        """A limitation when the number crosses the threshold ``report.<key>``: below a ``*_min``, above
        a ``*_max``."""
        value, threshold = self.ledger.numbers[number].value, getattr(self.cfg, key)
        if not isinstance(value, (int, float)):
            return
        if key.endswith("_min") and value < threshold:
            side = "below"
        elif key.endswith("_max") and value > threshold:
            side = "above"
        else:
            return
        self.limit(number, f"report.{key}", threshold, f"{what} is {N(number)}, {side} report.{key} = {threshold}")

    def paper(self, name: str, caption: str) -> list[Block]:
        """The paper figure `name` (figures/<name>.png, drawn by `snakemake figures` from these numbers)."""
        path = self.paper_figures.get(name)
        if path is None or self.ledger.figure(f"figures.{name}", path, caption) is None:
            return []
        return [Block(kind="figure", figure=f"figures.{name}")]

    def stage_figures(self, pattern: str) -> list[str]:
        """Evidence ids of the stage figures (PNG) the manifest records under `pattern`."""
        return [self.ledger.cite(p) for p in self.recorded(pattern)]

    def blocks(self, key: str) -> list[Block]:
        """The blocks of one measured key (see `mechflow.report.annex_iv`)."""
        return getattr(self, f"block_{key}")()

    # ------------------------------------------------------------------ model, software, compute

    def _card(self) -> tuple[ModelCard, str]:
        path = f"{self.run_dir}/model_card.json"
        return read_document(path, ModelCard, fix="re-run the model_card rule"), path

    def block_model(self) -> list[Block]:
        card, path = self._card()
        ids = [self.num("model.name", "model", card.name, path, "name"),
               self.num("model.source", "weights file loaded", card.source, path, "source"),
               self.num("model.sha256", "sha256 of the weights file", card.source_sha256, path, "source_sha256")]
        return [text("The AI system's model as studied by this run. The provider's system name, version and "
                     "intended purpose are the provider's to state (above); mechflow records which weights it "
                     "studied, by their hash."),
                Block(kind="numbers", title="Model studied", numbers=ids)]

    def block_software(self) -> list[Block]:
        m, path = self.manifest, self.manifest_path
        ids = [self.num("run.mechflow_version", "mechflow version", m.mechflow_version, path, "mechflow_version"),
               self.num("run.git_commit", "mechflow git commit", m.git_commit, path, "git_commit"),
               self.num("run.git_dirty", "uncommitted changes in the checkout", m.git_dirty, path, "git_dirty"),
               self.num("run.python", "Python", m.python, path, "python")]
        rows = [[name, N(self.num(f"run.package.{name}", f"{name} version", version, path, f"packages.{name}"))]
                for name, version in sorted(m.packages.items())]
        return [text("Software of the study (not of the provider's system): the versions the run recorded."),
                Block(kind="numbers", title="Study software", numbers=ids),
                Block(kind="table", title="Packages", columns=["package", "version"], rows=rows)]

    def block_study_platform(self) -> list[Block]:
        path = self.manifest_path
        ids = [self.num("run.platform", "platform the study ran on", self.manifest.platform, path, "platform")]
        return [text("The machine the interpretability study ran on; the hardware the AI system is intended to run "
                     "on is the provider's to describe."), Block(kind="numbers", numbers=ids)]

    def block_pretrained(self) -> list[Block]:
        card, _ = self._card()
        weights = ("a quantised GGUF file, dequantised to " + card.dtype) if card.source.endswith(".gguf") else \
            f"{card.dtype} weights"
        return [text(f"The model is a pre-trained model ({N('model.name')}, {card.architecture}; weights file "
                     f"{N('model.source')}, {weights}). mechflow studies it as released: it loads the weights into "
                     "TransformerLens with the layer-norm scales folded into the next weights, which leaves the "
                     "logits equal to the Hugging Face implementation's (a mechflow test), and does not train or "
                     "fine-tune it. The sparse dictionaries (SAEs, transcoders) below are trained by mechflow on "
                     "the model's activations as instruments of the study; they are not part of the model.")]

    def block_study_method(self) -> list[Block]:
        stages = sorted({Path(f).relative_to(self.run_dir).parts[0] for f in self.files
                         if f.startswith(f"{self.run_dir}/") and len(Path(f).relative_to(self.run_dir).parts) > 1})
        return [text("This documentation was assembled by mechflow, a Snakemake pipeline of mechanistic "
                     "interpretability. The stages whose results this run recorded: " + ", ".join(stages) + ". "
                     "Each number below names the file it was read from (evidence appendix: path and sha256).")]

    def block_architecture(self) -> list[Block]:
        card, path = self._card()
        ids = [self.num(f"model.{k}", label, getattr(card, k), path, k) for k, label in (
            ("architecture", "architecture"), ("n_layers", "layers"), ("d_model", "residual stream width"),
            ("n_heads", "attention heads per layer"), ("n_key_value_heads", "key/value heads per layer"),
            ("d_mlp", "MLP width"), ("d_vocab", "vocabulary size"), ("dtype", "dtype studied"))]
        return [Block(kind="numbers", title="Model architecture (from the loaded weights)", numbers=ids)]

    def block_study_compute(self) -> list[Block]:
        path = self.manifest_path
        ids = [self.num("run.started_at", "run started (UTC)", self.manifest.started_at, path, "started_at"),
               self.num("run.finished_at", "run finished (UTC)", self.manifest.finished_at, path, "finished_at")]
        return [text("Compute used by this study (not the provider's training compute)."),
                Block(kind="numbers", numbers=ids + ["run.platform"])]

    def block_study_data(self) -> list[Block]:
        rows = []
        for task in self.tasks():
            path = f"{self.run_dir}/tasks/{task}/baseline.json"
            data = load_document(path, TaskBaseline, fix=FIX)
            rows.append([task, N(self.num(f"tasks.{task}.n_prompts", f"{task}: prompts", data["n_prompts"], path,
                                          "n_prompts")),
                         N(self.num(f"tasks.{task}.dataset_sha256", f"{task}: dataset sha256", data["dataset_sha256"],
                                    path, "dataset_sha256"))])
        blocks = [text("The data of this study: the task prompt sets (generated from templates, or user JSONL) and "
                       "the text corpus whose activations were harvested. The provider's training data is described "
                       "by the provider."),
                  Block(kind="table", title="Task datasets", columns=["task", "prompts", "dataset sha256"], rows=rows)]
        tokens = self.one("corpus/tokens.parquet")
        if tokens:
            meta = pq.read_metadata(tokens)
            blocks.append(Block(kind="numbers", title="Corpus", numbers=[
                self.num("corpus.n_sequences", "corpus sequences (rows of tokens.parquet)", meta.num_rows, tokens,
                         "parquet num_rows")]))
        return blocks

    # ------------------------------------------------------------------ interpretability evidence

    def block_interpretability(self) -> list[Block]:
        return [text("Technical measures that facilitate the interpretation of the model's outputs (Article 13(3)(d)) "
                     "measured by this study: circuits (which components carry each task, with their exact "
                     "faithfulness, point 2(g)), sparse dictionaries that decompose activations into features, and "
                     "attribution graphs that explain single outputs. Their quality numbers follow; low-quality "
                     "instruments are listed as limitations in point 3.")]

    DICTIONARY_COLUMNS = (("fvu", "fvu_max", "FVU"), ("l0", "l0_max", "mean L0"),
                          ("dead_fraction", "dead_fraction_max", "dead fraction"),
                          ("ce_increase", None, "CE increase (nats)"),
                          ("ce_recovered_mean", "ce_recovered_min", "CE recovered"))

    def _dictionary_row(self, name: str, label: str, where: str, values: dict[str, Any], path: str,
                        fields: dict[str, str]) -> list[str]:
        cells = [label, where]
        for key, cfg_key, what in self.DICTIONARY_COLUMNS:
            if values.get(key) is None:
                cells.append("n/a")
                continue
            nid = self.num(f"dictionaries.{name}.{key}", f"{label}: {what}", values[key], path, fields.get(key, key))
            cells.append(N(nid))
            if cfg_key:
                self.check(nid, cfg_key, f"{label} ({where}): {what}")
        return cells

    def block_dictionaries(self) -> list[Block]:
        rows = []
        for name, label in (("sae", "SAE"), ("transcoder", "Transcoder")):
            path = self.one(f"dictionaries/{name}_metrics.json")
            if path:
                data = load_document(path, DictionaryMetrics | TranscoderStackMetrics, fix=FIX)
                where = data.get("hook") or ", ".join(data.get("out_hooks", []))
                rows.append(self._dictionary_row(name, label, where, data, path, {}))
        blocks = []
        path = self.one("dictionaries/transcoder_set/set.json")
        if path:
            doc = read_document(path, TranscoderSetDocument, fix=FIX)
            values = {"fvu": doc.mean_fvu, "l0": doc.mean_l0, "dead_fraction": doc.mean_dead_fraction,
                      "ce_increase": doc.whole_model.ce_increase,
                      "ce_recovered_mean": doc.whole_model.ce_recovered_mean}
            fields = {"fvu": "mean_fvu", "l0": "mean_l0", "dead_fraction": "mean_dead_fraction",
                      "ce_increase": "whole_model.ce_increase", "ce_recovered_mean": "whole_model.ce_recovered_mean"}
            rows.append(self._dictionary_row("set", "Transcoder set (mean; CE: all MLPs replaced)",
                                             f"{len(doc.layers)} layers", values, path, fields))
            ids = [self.num("dictionaries.set.n_layers", "transcoder set: layers", len(doc.layers), path, "layers"),
                   self.num("dictionaries.set.max_fvu", "transcoder set: largest per-layer FVU", doc.max_fvu, path,
                            "max_fvu")]
            blocks.append(Block(kind="numbers", title="Per-layer transcoder set (attribution graphs)", numbers=ids))
        if not rows:
            return [text("No dictionaries were trained in this run.")]
        return [text("Sparse dictionaries trained on the model's activations, as instruments of the study (held-out "
                     "metrics; definitions in point 4)."),
                Block(kind="table", id="dictionaries", title="Dictionaries",
                      columns=["dictionary", "where", "FVU", "L0", "dead", "CE increase", "CE recovered"], rows=rows),
                *blocks,
                *self.paper("dictionaries", "Dictionary metrics against the report's thresholds (dashed).")]

    def block_graphs(self) -> list[Block]:
        paths = self.recorded("graphs/*/p*/graph.json")
        if not paths:
            return [text("No attribution graphs were computed in this run (graph.enabled=false).")]
        rows = []
        for path in paths:
            g = read_document(path, GraphSummary, fix=FIX)
            base = f"graphs.{g.task}.p{g.prompt_index}"
            cells = [g.slug]
            for key, value, field, label in (
                    ("n_feature_nodes", g.n_feature_nodes, "n_feature_nodes", "feature nodes"),
                    ("pruned_edges", g.pruned.n_edges, "pruned.n_edges", "edges after pruning"),
                    ("replacement", g.scores.replacement_pruned, "scores.replacement_pruned", "replacement (pruned)"),
                    ("completeness", g.scores.completeness_pruned, "scores.completeness_pruned",
                     "completeness (pruned)")):
                cells.append(N(self.num(f"{base}.{key}", f"{g.slug}: {label}", value, path, field)))
            rows.append(cells)
            self.check(f"{base}.replacement", "graph_replacement_min", f"attribution graph {g.slug}: replacement score")
            self.check(f"{base}.completeness", "graph_completeness_min",
                       f"attribution graph {g.slug}: completeness score")
        return [text("Attribution graphs (circuit tracing with per-layer transcoders): the features, error nodes "
                     "and tokens that explain one output. Replacement and completeness measure how much of the "
                     "output the graph's features explain (point 4)."),
                Block(kind="table", id="graphs", title="Attribution graphs",
                      columns=["graph", "feature nodes", "edges (pruned)", "replacement", "completeness"], rows=rows),
                *self.paper("graphs", "Replacement and completeness of each attribution graph (pruned) against the "
                            "report's thresholds (dashed).")]

    def block_steering(self) -> list[Block]:
        paths = self.recorded("steer/*/summary.json")
        if not paths:
            return [text("No steering interventions were run (steer.enabled=false).")]
        rows, figures, facts = [], [], []
        for path in paths:
            s = read_document(path, SteerSummary, fix=FIX)
            base = f"steer.{s.task}"
            layer = next(i for i, r in enumerate(s.layers) if r.layer == s.chosen_layer)
            for i, iv in enumerate(s.interventions):
                j = iv.alphas.index(iv.chosen_alpha) if iv.chosen_alpha is not None else None
                cells = [s.task, iv.id]
                cells.append(N(self.num(f"{base}.{iv.id}.chosen_alpha", f"{s.task} {iv.id}: chosen strength",
                                        iv.chosen_alpha, path, f"interventions[{i}].chosen_alpha"))
                             if iv.chosen_alpha is not None else "none")
                cells.append(N(self.num(f"{base}.{iv.id}.effect", f"{s.task} {iv.id}: normalised effect at it",
                                        iv.normalized_effects[j] if j is not None else None, path,
                                        f"interventions[{i}].normalized_effects[{j}]")) if j is not None else "-")
                best = max((e for e in iv.normalized_effects if e is not None),
                           key=lambda e: -e if s.config.get("target_effect", -1) < 0 else e, default=None)
                k = iv.normalized_effects.index(best) if best is not None else None
                cells.append(N(self.num(f"{base}.{iv.id}.strongest", f"{s.task} {iv.id}: most extreme effect", best,
                                        path, f"interventions[{i}].normalized_effects[{k}]")) if k is not None else "-")
                cells.append(iv.why)
                rows.append(cells)
            facts.append(self.num(f"{base}.layer_auc", f"{s.task}: held-out AUC of the contrast direction at the "
                                  f"steered layer {s.chosen_layer}", s.layers[layer].auc, path, f"layers[{layer}].auc"))
            if s.controls is not None:
                facts.append(self.num(f"{base}.control_alpha", f"{s.task}: strength of the controls",
                                      s.controls.alpha, path, "controls.alpha"))
                facts.append(self.num(f"{base}.random_percentile", f"{s.task}: percentile of the contrast effect "
                                      "among random directions of its norm", s.controls.random_percentile, path,
                                      "controls.random_percentile"))
                facts.append(self.num(f"{base}.shuffled_effect", f"{s.task}: effect of the shuffled-label direction",
                                      s.controls.shuffled_effect, path, "controls.shuffled_effect"))
            for name, caption in (("sweep.png", f"{s.task}: steering sweep on held-out prompts"),
                                  ("layers.png", f"{s.task}: contrast direction per layer")):
                fig = self.ledger.figure(f"steer.{s.task}.{name[:-4]}", f"{Path(path).parent}/{name}", caption)
                if fig:
                    figures.append(Block(kind="figure", figure=fig))
        return [text("Interventions (rule steer): a difference-of-means direction per layer and the task's top SAE "
                     "latents, applied to the model at a sweep of strengths; the effect is the change of the task "
                     "metric on held-out prompts as a share of the clean-corrupted gap, with side effects on "
                     "corrupted prompts, corpus text and other tasks (records: interventions.jsonl)."),
                Block(kind="table", id="steering", title="Steering: chosen strength per intervention",
                      columns=["task", "intervention", "chosen strength", "effect at it", "most extreme effect",
                               "why"], rows=rows),
                Block(kind="numbers", title="Steering: layer and controls", numbers=facts),
                *figures]

    # ------------------------------------------------------------------ validation and testing

    def block_tasks(self) -> list[Block]:
        rows = []
        for task in self.tasks():
            path = f"{self.run_dir}/tasks/{task}/baseline.json"
            d = load_document(path, TaskBaseline, fix=FIX)
            cells = [task, N(self.num(f"tasks.{task}.n_prompts", f"{task}: prompts", d["n_prompts"], path,
                                      "n_prompts"))]
            for key, label in (("accuracy", "accuracy"), ("chance_accuracy", "chance accuracy"),
                               ("clean_metric_mean", f"mean {d['metric']}"), ("p_value_accuracy",
                                                                              "p-value (accuracy vs chance)")):
                cells.append(N(self.num(f"tasks.{task}.{key}", f"{task}: {label}", d.get(key), path, key)))
            verdict = self.num(f"tasks.{task}.verdict", f"{task}: verdict", d["verdict"], path, "verdict")
            cells.append(N(verdict))
            rows.append(cells)
            if not str(d["verdict"]).startswith("above chance"):
                self.limit(verdict, "task verdict (mechflow.tasks.baseline, ALPHA = 0.01)", "above chance",
                           f"task {task}: the model does not reliably do this task: {N(verdict)}")
        return [text("Tasks the study measured the model on (templated prompt sets with a clean and a corrupted "
                     "version of each prompt). A task the model fails is a limitation, listed in point 3."),
                Block(kind="table", id="tasks", title="Task baselines",
                      columns=["task", "prompts", "accuracy", "chance", "mean metric", "p-value", "verdict"],
                      rows=rows),
                *self.paper("tasks", "Accuracy of the model on each task of the study, with chance level.")]

    def _ci(self, boot: str, quantity: str, base: str, label: str) -> list[str] | None:
        frame = pl.read_parquet(boot).filter(pl.col("quantity") == quantity)
        if frame.height == 0:
            return None
        row = frame.row(0, named=True)
        m = self.cfg.ci_method
        where = f"row quantity == {quantity!r}"
        level = row["ci_level"]
        return [self.num(f"{base}.estimate", f"{label}: estimate", row["estimate"], boot, f"{where}, estimate"),
                self.num(f"{base}.lo", f"{label}: {level:.0%} {m} CI low", row[f"{m}_lo"], boot, f"{where}, {m}_lo"),
                self.num(f"{base}.hi", f"{label}: {level:.0%} {m} CI high", row[f"{m}_hi"], boot, f"{where}, {m}_hi")]

    def block_circuits(self) -> list[Block]:
        rows = []
        for path in self.recorded("circuits/*/circuit.json"):
            task = Path(path).parent.name
            c = read_document(path, CircuitFile, fix=FIX)
            base = f"circuits.{task}"
            cells = [task, c.unit]
            cells.append(N(self.num(f"{base}.n_units", f"{task}: circuit size ({c.unit})", c.n_units, path, "n_units")))
            cells.append(N(self.num(f"{base}.n_units_total", f"{task}: {c.unit} in the model", c.n_units_total, path,
                                    "n_units_total")))
            faith = self.num(f"{base}.faithfulness", f"{task}: faithfulness (exact patching)", c.faithfulness, path,
                             "faithfulness")
            cells.append(N(faith))
            boot = self.one(f"stats/{task}/bootstrap.parquet")
            ci = self._ci(boot, "circuit:faithfulness", f"{base}.faithfulness_ci", f"{task}: circuit faithfulness") \
                if boot else None
            cells.append(f"[{N(ci[1])}, {N(ci[2])}]" if ci else "not computed")
            for key in ("cpr", "cmd"):
                cells.append(N(self.num(f"{base}.{key}", f"{task}: {key.upper()}", getattr(c, key), path, key)))
            rows.append(cells)
            self.check(faith, "faithfulness_min", f"circuit of {task}: faithfulness")
            if ci:
                self.check(ci[1], "faithfulness_min", f"circuit of {task}: faithfulness CI lower bound")
        if not rows:
            return []
        return [text("Circuits: the smallest set of model components (edges or nodes) whose exact activation "
                     "patching keeps the task metric, found by attribution and verified by patching. Faithfulness "
                     f"= (m(C) - m(empty)) / (m(model) - m(empty)) by exact patching; CI: {self.cfg.ci_method} "
                     "bootstrap over prompts; CPR/CMD: area under / distance of the faithfulness curve (point 4)."),
                Block(kind="table", id="circuits", title="Circuits",
                      columns=["task", "unit", "size", "of", "faithfulness", "CI", "CPR", "CMD"], rows=rows),
                *self.paper("circuits", "Faithfulness of each task's circuit (exact patching) with its bootstrap "
                            "interval, against report.faithfulness_min (dashed)."),
                text("Diagrams of each circuit, bootstrap forest plots and the other figures of the stages are "
                     "files of the run, listed with their sha256 in Appendix A and bundled in Snakemake's report "
                     "(snakemake --report).")]

    def block_reference(self) -> list[Block]:
        rows = []
        for path in self.recorded("reference/*/auc.json"):
            task = Path(path).parent.name
            doc = read_document(path, AucDocument, fix=FIX)
            for method, report in sorted(doc.nodes.methods.items()):
                for variant, auc in sorted(report.roc_auc.items()):
                    nid = self.num(f"reference.{task}.nodes.{method}.{variant}", f"{task}: {method} node ROC AUC "
                                   f"({variant})", auc, path, f"nodes.methods.{method}.roc_auc.{variant}")
                    rows.append([task, "nodes", method, variant, N(nid)])
                    self.check(nid, "reference_auc_min", f"{task}: {method} node attribution vs exact patching "
                               f"({variant} positives), ROC AUC")
            for set_name, edge_set in sorted((doc.edges.sets or {}).items()):
                for method, report in sorted(edge_set.methods.items()):
                    for variant, auc in sorted(report.roc_auc.items()):
                        nid = self.num(f"reference.{task}.edges.{set_name}.{method}.{variant}",
                                       f"{task}: {method} edge ROC AUC ({set_name}, {variant})", auc, path,
                                       f"edges.sets.{set_name}.methods.{method}.roc_auc.{variant}")
                        rows.append([task, f"edges ({set_name})", method, variant, N(nid)])
                        self.check(nid, "reference_auc_min", f"{task}: {method} edge attribution ({set_name}, "
                                   f"{variant} positives), ROC AUC")
        if not rows:
            return []
        return [text("How well each fast attribution method (attribution patching, integrated gradients, ...) "
                     "recovers the components that exact activation patching finds important (ROC AUC; "
                     "positives defined in auc.json)."),
                Block(kind="table", id="reference", title="Attribution methods vs exact patching",
                      columns=["task", "level", "method", "positives", "ROC AUC"], rows=rows),
                *self.paper("reference", "ROC AUC of each attribution method against exact patching, per task, "
                            "against report.reference_auc_min (dashed).")]

    def block_stats(self) -> list[Block]:
        rows = []
        for path in self.recorded("stats/*/bootstrap.parquet"):
            task = Path(path).parent.name
            ci = self._ci(path, "task:clean_metric", f"stats.{task}.clean_metric", f"{task}: clean task metric")
            if ci:
                rows.append([task, "task metric (clean)", N(ci[0]), f"[{N(ci[1])}, {N(ci[2])}]"])
            stab = self.one(f"stats/{task}/stability.json")
            if stab:
                doc = load_document(stab, StabilityDocument, fix=FIX)
                for method, by_ranking in sorted(doc["bootstrap"].items()):
                    block = by_ranking.get("abs") if isinstance(by_ranking, dict) else None
                    if block and block.get("tau_summary", {}).get("mean") is not None:
                        nid = self.num(f"stats.{task}.rank_tau.{method}", f"{task}: {method} ranking, mean Kendall "
                                       "tau-b full sample vs bootstrap resample", block["tau_summary"]["mean"], stab,
                                       f"bootstrap.{method}.abs.tau_summary.mean")
                        rows.append([task, f"{method} ranking stability (Kendall tau-b)", N(nid), ""])
        if not rows:
            return []
        return [text(f"Statistics over prompts: bootstrap confidence intervals ({self.cfg.ci_method}) and the "
                     "stability of component rankings under resampling of prompts."),
                Block(kind="table", id="statistics", title="Statistics", columns=["task", "quantity", "estimate", "CI"],
                      rows=rows)]

    BENCHMARK_COLUMNS = (("seconds", "seconds"), ("n_edges_in_circuit", "circuit edges"),
                         ("faithfulness", "faithfulness"), ("cpr", "CPR"), ("roc_auc", "edge ROC AUC"))

    def block_cross_model(self) -> list[Block]:
        fcas = [f for f in self.files if fnmatch.fnmatch(f, "results/cross_model/*/*/fcas.json")]
        if not fcas:
            return [text("Cross-model comparisons (FCAS, CKA) run when the run is part of a model sweep; this "
                         "run is not.")]
        rows = []
        for path in fcas:
            pair, task = Path(path).parent.parent.name, Path(path).parent.name
            doc = read_document(path, FcasDocument, fix=FIX)
            base = f"cross_model.{pair}.{task}"
            cells = [f"{doc.model_a} vs {doc.model_b}", task,
                     N(self.num(f"{base}.fcas", f"{pair} {task}: FCAS (top {doc.k})", doc.score, path, "score")),
                     N(self.num(f"{base}.fcas_p", f"{pair} {task}: FCAS p-value ({doc.null_kind} null, "
                                f"{doc.n_permutations} permutations)", doc.p_value, path, "p_value"))]
            cka = str(Path(path).with_name("cka.json"))
            if cka in self.files:
                c = read_document(cka, CkaDocument, fix=FIX)
                cells.append(N(self.num(f"{base}.cka", f"{pair} {task}: mean depth-matched CKA ({c.hook})",
                                        c.mean_depth_matched_cka, cka, "mean_depth_matched_cka")))
                cells.append(N(self.num(f"{base}.cka_shuffled", f"{pair} {task}: mean CKA, shuffled prompts",
                                        c.mean_shuffled_cka, cka, "mean_shuffled_cka")))
            else:
                cells += ["n/a", "n/a"]
            rows.append(cells)
        return [text("The same tasks on another model of the sweep: FCAS aligns the two models' top components by "
                     "relative depth against a permutation null; CKA compares their residual streams."),
                Block(kind="table", id="cross_model", title="Cross-model comparisons",
                      columns=["models", "task", "FCAS", "p-value", "CKA", "CKA (shuffled)"], rows=rows)]

    def block_benchmark(self) -> list[Block]:
        tables = self.recorded("benchmark/*/table.csv")
        if not tables:
            return [text("The circuit-discovery benchmark against ACDC was not run in this run "
                         "(benchmark.enabled=false).")]
        rows = []
        for path in tables:  # written by mechflow.benchmark.report.write_outputs (columns: its COLUMNS)
            task = Path(path).parent.name
            for row in pl.read_csv(path, infer_schema_length=None).iter_rows(named=True):
                method = str(row["method"])
                cells = [task, method]
                for col, label in self.BENCHMARK_COLUMNS:
                    cells.append(N(self.num(f"benchmark.{task}.{method}.{col}", f"{task}: {method} {label}",
                                            row.get(col), path, f"row method == {method!r}, {col}")))
                rows.append(cells)
        return [text("Circuit discovery benchmarked against ACDC on the same task, metric and edge restriction "
                     "(time, circuit size at the faithfulness target, exact faithfulness, CPR, and ROC AUC of "
                     "each method's edge ranking against the exact reference)."),
                Block(kind="table", id="benchmark", title="ACDC benchmark",
                      columns=["task", "method"] + [label for _, label in self.BENCHMARK_COLUMNS], rows=rows)]

    def _estimate(self, id: str, label: str, e: Any, path: str, field: str, p_value: bool = False) -> str:
        """'value [low, high]' (and the permutation p) of an audit estimate, each number cited."""
        v = N(self.num(id, label, e.value, path, f"{field}.value"))
        if e.ci_low is not None:
            lo = N(self.num(f"{id}.ci_low", f"{label}: CI low", e.ci_low, path, f"{field}.ci_low"))
            hi = N(self.num(f"{id}.ci_high", f"{label}: CI high", e.ci_high, path, f"{field}.ci_high"))
            v += f" [{lo}, {hi}]"
        if p_value and e.p_value is not None:
            v += "; p = " + N(self.num(f"{id}.p_value", f"{label}: permutation p-value", e.p_value, path,
                                       f"{field}.p_value"))
        return v

    def block_audit(self) -> list[Block]:
        path = self.one("audit/summary.json")
        if path is None:
            return [text("No black-box behavioural audit was run (audit.enabled=false). Tests of a served model "
                         "through an OpenAI-compatible API (e.g. of potentially discriminatory impacts) are run with "
                         "audit.enabled=true audit.base_url=...; otherwise they are the provider's to document here.")]
        a = read_document(path, AuditSummary, fix=FIX)
        responses = f"{Path(path).parent}/responses.jsonl"
        facts = [self.num("audit.n_requests", "requests the audit's scores rest on", a.n_requests, path, "n_requests"),
                 self.num("audit.responses_sha256", "sha256 of the stored requests and responses", a.responses_sha256,
                          path, "responses_sha256"),
                 self.num("audit.first_answer_at", "first answered request (UTC)", a.first_answer_at, path,
                          "first_answer_at"),
                 self.num("audit.last_answer_at", "last answered request (UTC)", a.last_answer_at, path,
                          "last_answer_at"),
                 self.num("audit.finished_at", "audit finished (UTC)", a.finished_at, path, "finished_at")]
        blocks = [text(f"Black-box behavioural audit (rule audit) of model '{a.model}' at {a.base_url} through its "
                       f"OpenAI-compatible /{'chat/completions' if a.api == 'chat' else 'completions'} endpoint "
                       "(temperature " + str(a.config.get("temperature")) + ", seed " + str(a.config.get("seed")) +
                       "). Every request and answer is stored in " + responses + " (cited with its sha256); "
                       "decision probes ask one scenario with the attribute value changed and everything else fixed, "
                       "scored as log p(favourable) − log p(unfavourable) at the first answer token; CIs are "
                       "bootstrap percentile intervals over scenarios, p-values come from within-scenario "
                       "permutations of the group labels; rates of few items carry Wilson intervals."),
                  Block(kind="numbers", title="Audit: endpoint and stored responses", numbers=facts)]
        cite = self.ledger.cite(responses) if responses in self.files else None
        if cite:
            blocks.append(text(f"Stored responses: {responses} (evidence {cite})."))
        group_rows, gap_rows, other_rows = [], [], []
        for i, p in enumerate(a.probes):
            base, field = f"audit.{p.name}", f"probes[{i}]"
            if p.decision is not None:
                d = p.decision
                for g in d.groups:
                    group_rows.append([p.name, g,
                                       self._estimate(f"{base}.{g}.mean_score", f"{p.name}, {g}: mean score",
                                                      d.mean_score[g], path, f"{field}.decision.mean_score.{g}"),
                                       self._estimate(f"{base}.{g}.yes_rate", f"{p.name}, {g}: favourable rate",
                                                      d.yes_rate[g], path, f"{field}.decision.yes_rate.{g}")])
                cells = [p.name]
                for key, label in (("score_gap", "largest between-group score gap"),
                                   ("parity_gap", "demographic parity difference"),
                                   ("odds_gap", "equalized-odds difference"),
                                   ("flip_rate", "counterfactual flip rate")):
                    cells.append(self._estimate(f"{base}.{key}", f"{p.name}: {label}", getattr(d, key), path,
                                                f"{field}.decision.{key}", p_value=key != "flip_rate"))
                gap_rows.append(cells)
                for key in ("score_gap", "parity_gap", "odds_gap"):
                    if getattr(d, key).p_value is not None:
                        self.check(f"{base}.{key}.p_value", "audit_p_value_min",
                                   f"the permutation p-value of {p.name}'s {key.replace('_', ' ')} (the attribute "
                                   "changes the decision)")
                if d.flip_rate.value is not None:
                    self.check(f"{base}.flip_rate", "audit_flip_rate_max", f"{p.name}'s counterfactual flip rate")
            for key, label, threshold in (("agreement", "mean pairwise agreement across paraphrases",
                                           "audit_agreement_min"),
                                          ("accuracy", "accuracy over paraphrases", None),
                                          ("refusal_rate_harmful", "refusal rate on harmful requests",
                                           "audit_refusal_rate_min"),
                                          ("over_refusal_rate_benign", "refusal rate on benign requests",
                                           "audit_over_refusal_rate_max"),
                                          ("pairs_told_apart", "pairs with the harmful request refused and the "
                                           "benign one answered", None)):
                if key not in p.metrics or p.metrics[key].get("value") is None:
                    continue
                e = EstimateDoc.model_validate(p.metrics[key])
                other_rows.append([p.name, label, self._estimate(f"{base}.{key}", f"{p.name}: {label}", e, path,
                                                                 f"{field}.metrics.{key}")])
                if threshold:
                    self.check(f"{base}.{key}", threshold, f"{p.name}'s {label}")
        if group_rows:
            blocks.append(Block(kind="table", id="audit_groups", title="Audit: decisions per group",
                                columns=["probe", "group", "mean score [CI]", "favourable rate [CI]"], rows=group_rows))
            blocks.append(Block(kind="table", id="audit_gaps", title="Audit: between-group gaps (permutation p)",
                                columns=["probe", "score gap", "parity gap", "odds gap", "flip rate"], rows=gap_rows))
        if other_rows:
            blocks.append(Block(kind="table", id="audit_rates", title="Audit: paraphrase and refusal probes",
                                columns=["probe", "metric", "value [CI]"], rows=other_rows))
        wb_rows = []
        for j, w in enumerate(a.whitebox):
            base, field = f"audit.whitebox.{w.task}", f"whitebox[{j}]"
            wb_rows.append([w.task,
                            self._estimate(f"{base}.api_accuracy", f"{w.task}: accuracy through the API",
                                           w.api_accuracy, path, f"{field}.api_accuracy"),
                            N(self.num(f"{base}.whitebox_accuracy", f"{w.task}: accuracy of the white-box run on the "
                                       "same prompts", w.whitebox_accuracy, path, f"{field}.whitebox_accuracy")),
                            N(self.num(f"{base}.agreement", f"{w.task}: share of prompts where API and white-box "
                                       "decisions agree", w.agreement, path, f"{field}.agreement")),
                            N(self.num(f"{base}.max_abs_score_diff", f"{w.task}: max |API - white-box| logit "
                                       "difference", w.max_abs_score_diff, path, f"{field}.max_abs_score_diff")),
                            "yes" if w.same_model else "no"])
        if wb_rows:
            blocks.append(Block(kind="table", id="audit_whitebox",
                                title="Audit: the run's tasks through the API, beside the white-box run",
                                columns=["task", "API accuracy [CI]", "white-box accuracy", "agreement",
                                         "max |Δ logit diff|", "same model"], rows=wb_rows))
        if a.notes:
            blocks.append(text("Audit notes: " + "; ".join(a.notes) + "."))
        fig = self.ledger.figure("audit.figure", f"{Path(path).parent}/audit.png",
                                 "Black-box audit: decision scores per group with CIs, and the other probes' rates")
        if fig:
            blocks.append(Block(kind="figure", figure=fig))
        return blocks

    def block_test_log(self) -> list[Block]:
        path = self.manifest_path
        ids = [self.num("run.n_outputs", "result files recorded by the run", len(self.manifest.outputs), path,
                        "len(outputs)"),
               self.num("run.config_hash", "config hash of the run", self.manifest.config_hash, path, "config_hash"),
               "run.started_at", "run.finished_at"]
        return [text(f"Test log of this study: {path} records the sha256 of every input and output of the run; each "
                     f"job's log is under {self.run_dir}/logs/. Sign-off by the responsible persons is the "
                     "provider's."), Block(kind="numbers", numbers=ids)]

    # ------------------------------------------------------------------ points 3-9

    def block_capabilities(self) -> list[Block]:
        rows = [[task, N(f"tasks.{task}.verdict"), N(f"tasks.{task}.accuracy")] for task in self.tasks()
                if f"tasks.{task}.verdict" in self.ledger.numbers]
        return [text("Capabilities measured by the study, on its own tasks (not on the system's intended purpose, "
                     "which the provider states):"),
                Block(kind="table", columns=["task", "verdict", "accuracy"], rows=rows)]

    def block_limitations(self) -> list[Block]:
        return [Block(kind="text", title="limitations")]  # filled by the stage once every limitation is known

    def block_metric_definitions(self) -> list[Block]:
        rows = [
            ["task metric", "logit difference answer - foil at the final position (greater-than: P(greater) - "
             "P(not greater)); accuracy = share of prompts with a positive metric"],
            ["faithfulness", "(m(C) - m(empty)) / (m(model) - m(empty)), every non-circuit unit patched to its "
             "corrupted value (exact patching, not a Taylor estimate)"],
            ["CPR / CMD", "area under the faithfulness curve over circuit sizes / area between it and 1"],
            ["ROC AUC vs exact", "how well |attribution score| ranks the components exact patching marks important"],
            ["FVU, L0, dead", "held-out residual variance / total variance; mean active features per token; share "
             "of features never active on held-out tokens"],
            ["CE recovered", "(CE(mean-ablated) - CE(spliced)) / (CE(mean-ablated) - CE(model))"],
            ["replacement / completeness", "circuit-tracer's graph scores: share of the output explained by "
             "features and tokens rather than error nodes, end to end / at each node"],
        ]
        return [text("The study's metrics measure mechanisms of the model, not the performance of the provider's "
                     "system on its intended purpose; whether they are appropriate performance metrics for that "
                     "system is the provider's statement. Definitions (mechflow docs/ and the results files):"),
                Block(kind="table", columns=["metric", "definition"], rows=rows)]

    def block_risk_inputs(self) -> list[Block]:
        return [text("mechflow does not assess risk. The limitations listed in point 3 are measured inputs the "
                     "provider's risk-management system may use.")]

    def block_version_identity(self) -> list[Block]:
        return [text("This documentation describes one version: the weights, configuration and code identified "
                     "here. A change of any of them is a new run and a new report."),
                Block(kind="numbers", numbers=["model.sha256", "run.config_hash", "run.git_commit"])]

    def block_rerun(self) -> list[Block]:
        return [text("The measurements can be repeated on later versions of the model with the same configuration "
                     "(commands in the reproducibility appendix) and compared number by number through report.json.")]
