"""Measure the per-token costs `mechflow plan` extrapolates from (``benchmarks/costs.py`` runs this).

Each measurement runs the real stage function (`prepare_corpus`, `harvest`, `train_sae`) or real
TransformerLens forwards in **its own child process**, so its peak resident memory (``ru_maxrss`` of
that child, from ``os.wait4``) is its own and nothing is shared between measurements. Torch threads
are pinned (``--threads``). The fitted rates:

* ``forward_flops_per_s``: Σ forward FLOPs / Σ seconds over forwards stopped after several depths;
* ``write_seconds_per_value``: (harvest seconds − its forward's predicted seconds) / stored values,
  from the harvest point with the deepest forward;
* ``training_flops_per_s`` and ``training_seconds_per_token``: the line ``seconds/token = a + flops/F``
  through two SAE widths trained on the same shards;
* ``load_rss_factor``: (harvest peak − base − shard buffers − activations) / weight bytes, at the
  deep harvest point; the scaling series tests it.

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
        stop = max(int(h.split(".")[1]) for h in hooks) + 1
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
    f_rate = sum(p["flops_per_token"] * p["tokens"] for p in forward) / sum(p["seconds"] for p in forward)
    log(f"forward: {f_rate / 1e9:.1f} GFLOP/s")

    deep = harvest(16_384, DEEP_HOOKS, "deep")
    pred_fwd = deep["tokens"] * shape.forward_flops(CTX, deep["stop_layer"], unembed=False) / f_rate
    write_s = max(deep["seconds"] - pred_fwd, 0.0) / (deep["tokens"] * deep["stored_values_per_token"])
    stored = deep["disk_bytes"] / (deep["tokens"] * deep["stored_values_per_token"])

    series = [harvest(m * DEFAULT_TOKENS, SHALLOW_HOOKS, f"x{m}") for m in multiples]

    wide = train(deep["tokens"], "deep", 4608, 40_960, "sae_4608")
    narrow = train(deep["tokens"], "deep", 1152, 40_960, "sae_1152")
    per_tok = [p["seconds"] / p["tokens"] for p in (wide, narrow)]
    flops = [12 * p["d_in"] * p["d_sae"] for p in (wide, narrow)]
    slope = (per_tok[0] - per_tok[1]) / (flops[0] - flops[1])  # seconds per FLOP
    t_rate, t_fixed = 1 / slope, per_tok[1] - flops[1] * slope
    scaling_train = [train(m * DEFAULT_TOKENS, f"x{m}", 1152, m * DEFAULT_TOKENS, f"sae_x{m}") for m in multiples]

    from mechflow.plan.estimate import MB as _MB
    from mechflow.plan.estimate import loaded_weight_bytes

    first = deep  # fitted on the deep point; the scaling series tests it
    buffers = 2 * min(first["shard_rows"], first["tokens"]) * first["stored_values_per_token"] * 4
    acts = 2 * 8 * CTX * (4 * shape.d_model + 3 * shape.d_mlp + shape.n_heads * CTX) * 4
    load_factor = (first["peak_rss_mb"] * _MB - base * _MB - buffers - acts) / loaded_weight_bytes(shape)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    return {
        "schema_version": _schema_version(), "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "commit": commit, "measured_on": dt.datetime.now(dt.UTC).date().isoformat(), "model": "smollm2_135m",
        "context_size": CTX, "threads": threads, "forward_flops_per_s": f_rate, "write_seconds_per_value": write_s,
        "stored_bytes_per_value": stored, "training_flops_per_s": t_rate, "training_seconds_per_token": t_fixed,
        "base_rss_mb": base, "load_rss_factor": load_factor, "forward": forward,
        "harvest": [deep, *series], "training": [wide, narrow, *scaling_train],
    }


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
