r"""Dictionary recipe study: what each change to a training recipe does to held-out quality.

Every recipe is a list of Hydra overrides on top of the study's base overrides (`--recipes`, a
YAML file, default `benchmarks/sae_recipes.yaml`). Each one trains a dictionary on the SAME
harvest with the pipeline's own stage functions (`mechflow.dictionaries.train_sae`, SAELens'
trainer; `train_transcoder`), is evaluated by the pipeline's own `evaluate_dictionary` /
`evaluate_transcoder` on the same held-out shards, and lands in `<out>/<recipe>/`. Finished
recipes are skipped (their config hash is checked), so the study resumes after a kill, and two
processes with disjoint `--only` lists can share the two cores (pass `--threads 1` to each).
`--report` collects every finished recipe into `table.csv` and `recipes.md` (numbers read back
from each recipe's `metrics.json` and `training.json`).

    python benchmarks/sae_recipes.py --run-dir results/sae_study --out results/sae_recipes --threads 1 \
        --only baseline,aux_window_25
    python benchmarks/sae_recipes.py --run-dir results/sae_study --out results/sae_recipes --report
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path

import torch
import yaml

from mechflow.config import compose_config
from mechflow.contracts.filenames import SHARD_MANIFEST
from mechflow.io import atomic_write_json, canonical_hash

log = logging.getLogger("benchmarks.sae_recipes")
HERE = Path(__file__).resolve().parent
COLUMNS = ("recipe", "stage", "changes", "training_tokens", "train_seconds", "tokens_per_second",
           "explained_variance", "explained_variance_with_outliers", "fvu", "l0", "dead_fraction", "n_tokens",
           "ce_clean", "ce_spliced", "ce_increase", "ce_recovered_zero", "ce_recovered_mean", "kl_spliced")


def load_recipes(path: Path) -> tuple[list[str], dict[str, dict]]:
    doc = yaml.safe_load(Path(path).read_text())
    recipes = {}
    for name, spec in doc["recipes"].items():
        spec = {"overrides": spec} if isinstance(spec, list) else dict(spec)
        recipes[name] = {"stage": spec.get("stage", "sae"), "overrides": list(spec.get("overrides") or []),
                         "note": spec.get("note", "")}
    return list(doc.get("base") or []), recipes


def run_recipe(name: str, recipe: dict, base: list[str], run_dir: Path, out: Path) -> dict:
    from mechflow.dictionaries import evaluate_dictionary, evaluate_transcoder, train_sae, train_transcoder
    from mechflow.dictionaries.config import TranscoderConfig, parse_config

    cfg = compose_config(base + recipe["overrides"])
    stage = recipe["stage"]
    group = cfg[stage]
    key = canonical_hash({"stage": stage, "group": group, "model": cfg["model"]})
    folder = out / name
    done = folder / "recipe.json"
    if done.exists() and json.loads(done.read_text()).get("config_hash") == key:
        log.info("%s: already done", name)
        return json.loads(done.read_text())
    tokens = run_dir / "corpus" / "tokens.parquet"
    wandb = {"mode": "disabled"}
    t0 = time.perf_counter()
    if stage == "sae":
        manifest = run_dir / "harvest" / group["hook"] / SHARD_MANIFEST
        training = train_sae(group, manifest=manifest, out_dir=folder / "sae", model_cfg=cfg["model"], wandb_cfg=wandb)
        metrics = evaluate_dictionary(group, dictionary=folder / "sae", manifest=manifest, tokens=tokens,
                                      metrics=folder / "metrics.json", model_cfg=cfg["model"])
    else:
        tc = parse_config(TranscoderConfig, group, "transcoder")
        hooks = [h.format(layer=layer) for layer in tc.layers for h in (tc.in_hook, tc.out_hook)]
        manifests = [run_dir / "harvest" / h / SHARD_MANIFEST for h in hooks]
        training = train_transcoder(group, manifests=manifests, out_dir=folder / "transcoder",
                                    model_cfg=cfg["model"], wandb_cfg=wandb)
        metrics = evaluate_transcoder(group, dictionary=folder / "transcoder", manifests=manifests, tokens=tokens,
                                      metrics=folder / "metrics.json", model_cfg=cfg["model"])
    record = {"recipe": name, "stage": stage, "changes": recipe["overrides"], "note": recipe["note"],
              "base": base, "config_hash": key, "config": group, "wall_seconds": time.perf_counter() - t0,
              "torch_threads": torch.get_num_threads(),
              "training": {k: training.get(k) for k in ("training_tokens", "seconds", "tokens_per_second")},
              "metrics_file": "metrics.json"}
    atomic_write_json(done, record)
    log.info("%s: EV %.3f, L0 %.1f, dead %.3f, CE +%.3f", name, metrics.get("explained_variance", float("nan")),
             metrics["l0"], metrics["dead_fraction"], metrics.get("ce_increase", float("nan")))
    return record


def report(out: Path, order: list[str]) -> list[dict]:
    rows = []
    for name in order:
        done = out / name / "recipe.json"
        if not done.exists():
            continue
        rec = json.loads(done.read_text())
        m = json.loads((out / name / rec["metrics_file"]).read_text())
        if "explained_variance_with_outliers" not in m:
            m["explained_variance_with_outliers"] = None
        row = {"recipe": name, "stage": rec["stage"], "changes": " ".join(rec["changes"]) or "(base)",
               "training_tokens": rec["training"]["training_tokens"], "train_seconds": rec["training"]["seconds"],
               "tokens_per_second": rec["training"]["tokens_per_second"]}
        row.update({c: m.get(c) for c in COLUMNS if c not in row})
        rows.append(row)
    with open(out / "table.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)

    def fmt(v):
        return "—" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    lines = ["# Dictionary recipe study", "", "Each row: one recipe (Hydra overrides on the base), trained and "
             "evaluated by the pipeline's stage functions on the same harvest and held-out shards. Source: "
             "`<recipe>/metrics.json`, `<recipe>/recipe.json`.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    (out / "recipes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", type=Path, required=True, help="a run folder with corpus/ and harvest/")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--recipes", type=Path, default=HERE / "sae_recipes.yaml")
    ap.add_argument("--only", default=None, help="comma-separated recipe names (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="only collect finished recipes into the table")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    base, recipes = load_recipes(args.recipes)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        names = args.only.split(",") if args.only else list(recipes)
        unknown = [n for n in names if n not in recipes]
        if unknown:
            raise SystemExit(f"--only: unknown recipes {unknown}; known: {list(recipes)}")
        for name in names:
            run_recipe(name, recipes[name], base, args.run_dir, args.out)
    report(args.out, list(recipes))


if __name__ == "__main__":
    main()
