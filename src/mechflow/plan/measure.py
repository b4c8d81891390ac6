"""Measure the per-token costs `mechflow plan` extrapolates from (``benchmarks/costs.py`` runs this).

Each measurement runs the real stage function (`prepare_corpus`, `harvest`, `train_sae`) or real
TransformerLens forwards in **its own child process**, so its peak resident memory (``ru_maxrss`` of
that child, from ``os.wait4``) is its own and nothing is shared between measurements. Torch threads
are pinned (``--threads``). The fitted rates:

the rates are fitted to all points by least squares (`fit`, which can refit a stored measurement), and
docs/plan.md lists every point beside its estimate.

Then the scaling series: the same harvest hooks and a small SAE at 1×, 4× and 10× the default
corpus (100,000 tokens), whose peak RSS must stay flat (docs/plan.md plots it).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mechflow.contracts.hooks import hook_layer

MB = 1024 * 1024
CTX = 128
DEFAULT_TOKENS = 100_000
DEEP_HOOKS = ["blocks.6.hook_resid_post", "blocks.15.hook_resid_post", "blocks.15.ln2.hook_normalized",
              "blocks.15.hook_mlp_out"]  # the default harvest's hooks
SHALLOW_HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.ln2.hook_normalized",
                 "blocks.1.hook_mlp_out"]  # the same widths, a 2-block forward: the scaling series


def _compose(overrides: list[str]) -> dict:
    from mechflow.config import compose_config

    return compose_config(overrides)


def _child(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run in the child process: one measurement; returns what it measured (seconds etc.)."""
    import torch

    torch.set_num_threads(int(spec["threads"]))
    if kind == "base":
        import transformer_lens  # noqa: F401

        import mechflow.dictionaries  # noqa: F401
        import mechflow.harvest  # noqa: F401
        return {}
    cfg = _compose(spec["overrides"])
    if kind == "corpus":
        from mechflow.corpus import prepare_corpus

        prepare_corpus(cfg["corpus"], model_cfg=cfg["model"], tokens=Path(spec["tokens"]),
                       corpus_manifest=Path(spec["tokens"]).with_suffix(".json"))
        return {}
    if kind == "forward":
        from mechflow.corpus import read_contexts
        from mechflow.models import load_model_from_cfg

        model = load_model_from_cfg(cfg["model"]).model
        contexts = torch.from_numpy(read_contexts(Path(spec["tokens"]))[: spec["n_contexts"]])
        out = []
        for layers in spec["layers"]:
            best = float("inf")
            for _ in range(2):
                start = time.perf_counter()
                with torch.inference_mode():
                    for i in range(0, len(contexts), 8):
                        model(contexts[i : i + 8], stop_at_layer=layers)
                best = min(best, time.perf_counter() - start)
            out.append({"layers": layers, "tokens": int(contexts.numel()), "seconds": best})
        return {"points": out}
    if kind == "harvest":
        from mechflow.harvest import harvest

        start = time.perf_counter()
        harvest(cfg["harvest"], model_cfg=cfg["model"], tokens=Path(spec["tokens"]), index=Path(spec["index"]),
                harvest_dir=Path(spec["harvest_dir"]))
        seconds = time.perf_counter() - start
        disk = sum(p.stat().st_size for p in Path(spec["harvest_dir"]).rglob("*.parquet"))
        return {"seconds": seconds, "disk_bytes": disk}
    if kind == "train":
        from mechflow.dictionaries import train_sae

        start = time.perf_counter()
        train_sae(cfg["sae"], manifest=Path(spec["manifest"]), out_dir=Path(spec["out_dir"]), model_cfg=cfg["model"],
                  wandb_cfg={"mode": "disabled", "project": "mechflow"})
        return {"seconds": time.perf_counter() - start}
    raise ValueError(kind)


def run_child(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """`_child` in a fresh interpreter; adds its peak RSS in MB (its own ``ru_maxrss``)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
           "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mechflow.plan.measure", kind, json.dumps(spec), out.name],
                                env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"measurement {kind} failed (exit {proc.returncode}): {spec}")
        result = json.loads(Path(out.name).read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: kilobytes
    return result


def _overrides(tokens: int, hooks: list[str], extra: list[str] = ()) -> list[str]:
    return ["corpus=python_docstrings", f"corpus.max_tokens={tokens}", "harvest.layers=[]",
            f"harvest.hooks=[{','.join(hooks)}]", "harvest.progress=false", *extra]


def measure(work: Path, *, threads: int = 1, multiples: tuple[int, ...] = (1, 4, 10), log=print) -> dict[str, Any]:
    """Every measurement of `MeasuredCosts` plus the scaling series, in child processes under `work`."""
    from mechflow.plan.shapes import preset

    shape = preset("smollm2_135m")
    work.mkdir(parents=True, exist_ok=True)
    spec0 = {"threads": threads}
    base = run_child("base", spec0)["peak_rss_mb"]
    log(f"base process: {base:.0f} MB")

    def corpus(n: int) -> Path:
        tokens = work / f"tokens_{n}.parquet"
        if not tokens.exists():
            run_child("corpus", {**spec0, "overrides": _overrides(n, SHALLOW_HOOKS), "tokens": str(tokens)})
        return tokens

    def harvest(n: int, hooks: list[str], name: str) -> dict[str, Any]:
        out = work / name
        spec = {**spec0, "overrides": _overrides(n, hooks), "tokens": str(corpus(n)), "index": str(out / "index.json"),
                "harvest_dir": str(out / "acts")}
        r = run_child("harvest", spec)
        stop = max(hook_layer(h) for h in hooks) + 1
        point = {"tokens": n, "hooks": hooks, "stop_layer": stop,
                 "stored_values_per_token": sum(shape.width_of(h) for h in hooks), "shard_rows": 12800,
                 "seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"], "disk_bytes": r["disk_bytes"]}
        log(f"harvest {name}: {n} tokens, {r['seconds']:.1f} s, peak {r['peak_rss_mb']:.0f} MB")
        return point

    def train(n: int, harvest_name: str, d_sae: int, tokens: int, name: str) -> dict[str, Any]:
        manifest = work / harvest_name / "acts" / "blocks.1.hook_resid_post" / "_manifest.json"
        if not manifest.exists():
            manifest = work / harvest_name / "acts" / "blocks.15.hook_resid_post" / "_manifest.json"
        hook = manifest.parent.name
        extra = [f"sae.hook={hook}", f"sae.d_sae={d_sae}", f"sae.training_tokens={tokens}", "sae.n_checkpoints=0",
                 "sae.lr_warm_up_steps=0", "sae.lr_decay_steps=0", "sae.eval.max_tokens=4096"]
        spec = {**spec0, "overrides": _overrides(n, SHALLOW_HOOKS, extra), "manifest": str(manifest),
                "out_dir": str(work / name)}
        r = run_child("train", spec)
        log(f"train {name}: d_sae {d_sae}, {tokens} tokens on a {n}-token harvest, {r['seconds']:.1f} s, "
            f"peak {r['peak_rss_mb']:.0f} MB")
        return {"tokens": tokens, "d_in": shape.d_model, "d_sae": d_sae, "corpus_tokens": n, "seconds": r["seconds"],
                "peak_rss_mb": r["peak_rss_mb"]}

    # forward FLOP rate: TL forwards stopped after 4, 16 and 30 blocks on the same 64 contexts
    fwd = run_child("forward", {**spec0, "overrides": _overrides(DEFAULT_TOKENS, SHALLOW_HOOKS),
                                "tokens": str(corpus(DEFAULT_TOKENS)), "n_contexts": 64, "layers": [4, 16, 30]})
    forward = [{**p, "flops_per_token": shape.forward_flops(CTX, p["layers"], unembed=False)} for p in fwd["points"]]
    deep = harvest(16_384, DEEP_HOOKS, "deep")
    series = [harvest(m * DEFAULT_TOKENS, SHALLOW_HOOKS, f"x{m}") for m in multiples]
    wide = train(deep["tokens"], "deep", 4608, 40_960, "sae_4608")
    narrow = train(deep["tokens"], "deep", 1152, 40_960, "sae_1152")
    scaling_train = [train(m * DEFAULT_TOKENS, f"x{m}", 1152, m * DEFAULT_TOKENS, f"sae_x{m}") for m in multiples]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    return fit({
        "schema_version": _schema_version(), "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "commit": commit, "measured_on": dt.datetime.now(dt.UTC).date().isoformat(), "model": "smollm2_135m",
        "context_size": CTX, "threads": threads, "base_rss_mb": base, "forward": forward,
        "harvest": [deep, *series], "training": [wide, narrow, *scaling_train],
    })


def fit(doc: dict[str, Any]) -> dict[str, Any]:
    """The rates of `MeasuredCosts` fitted to a measurement's points (``doc`` holds the points; returned
    with the fitted fields added). Least squares, each model linear in its unknowns:

    * forward: ``Σ FLOPs / Σ seconds`` over the forward points;
    * harvest: ``seconds − tokens · F_fwd(stop)/forward_rate = startup + w · tokens · values`` over every
      harvest point (``startup``: imports, model load, manifests; ``w``: seconds per stored value);
    * training: ``seconds = startup + tokens · (a + 12·d_in·d_sae / training_rate)`` over every training
      point (two widths, three token counts);
    * memory: ``load_rss_factor`` from the first (deep) harvest point (the other harvest points test
      it); the training's two copy counts by least squares over every training point (`_training_memory`).
    """
    import numpy as np

    from mechflow.plan.estimate import MB as _MB
    from mechflow.plan.estimate import loaded_weight_bytes
    from mechflow.plan.shapes import preset

    shape, ctx = preset(doc["model"]), int(doc["context_size"])
    fwd = doc["forward"]
    f_rate = sum(p["flops_per_token"] * p["tokens"] for p in fwd) / sum(p["seconds"] for p in fwd)
    h = doc["harvest"]
    y = np.array([p["seconds"] - p["tokens"] * shape.forward_flops(ctx, p["stop_layer"], unembed=False) / f_rate
                  for p in h])
    a = np.array([[1.0, p["tokens"] * p["stored_values_per_token"]] for p in h])
    (h_startup, write_s), *_ = np.linalg.lstsq(a, y, rcond=None)
    stored = sum(p["disk_bytes"] for p in h) / sum(p["tokens"] * p["stored_values_per_token"] for p in h)
    t = doc["training"]
    a = np.array([[1.0, p["tokens"], p["tokens"] * 12 * p["d_in"] * p["d_sae"]] for p in t])
    (t_startup, t_fixed, per_flop), *_ = np.linalg.lstsq(a, np.array([p["seconds"] for p in t]), rcond=None)
    deep = h[0]
    buffers = 2 * min(deep["shard_rows"], deep["tokens"]) * deep["stored_values_per_token"] * 4
    acts = 2 * 8 * ctx * (4 * shape.d_model + 3 * shape.d_mlp + shape.n_heads * ctx) * 4
    load_factor = (deep["peak_rss_mb"] * _MB - doc["base_rss_mb"] * _MB - buffers - acts) / loaded_weight_bytes(shape)
    c_buf, c_batch = _training_memory(doc["base_rss_mb"], t)
    fitted = {"forward_flops_per_s": f_rate, "harvest_startup_s": max(float(h_startup), 0.0),
              "write_seconds_per_value": max(float(write_s), 0.0), "stored_bytes_per_value": stored,
              "training_startup_s": max(float(t_startup), 0.0), "training_flops_per_s": 1 / float(per_flop),
              "training_seconds_per_token": max(float(t_fixed), 0.0), "load_rss_factor": load_factor,
              "training_buffer_copies": c_buf,
              "training_batch_copies": c_batch}
    points = {k: doc[k] for k in ("forward", "harvest", "training")}
    head = {k: v for k, v in doc.items() if k not in points and k not in fitted}
    return {**head, **fitted, **points}


def _training_memory(base_mb: float, points: list[dict[str, Any]]) -> tuple[float, float]:
    """Least squares over every training point of ``peak − base − 16·n_params = c_buf · buffer + c_batch ·
    batch`` (buffer: min(65,536, tokens) x d_in float32; batch: 2,048 x d_sae float32), in MB. An
    intercept is not fitted: with one, the exact solution on these points is a negative overhead."""
    import numpy as np

    from mechflow.plan.estimate import MB as _MB
    from mechflow.plan.estimate import dictionary_params

    rows, rhs = [], []
    for p in points:
        params = dictionary_params(p["d_in"], p["d_sae"], p["d_in"])
        rows.append([min(65536, p["tokens"]) * p["d_in"] * 4 / _MB, 2048 * p["d_sae"] * 4 / _MB])
        rhs.append(p["peak_rss_mb"] - base_mb - 16 * params / _MB)
    (c_buf, c_batch), *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    return float(c_buf), float(c_batch)


def _schema_version() -> str:
    from mechflow.contracts.versions import SCHEMA_VERSION

    return SCHEMA_VERSION


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    kind, spec, out = argv
    result = _child(kind, json.loads(spec))
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
