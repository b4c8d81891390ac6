"""Training throughput of SAELens' SAETrainer fed from Parquet shards vs from an in-memory tensor.

Both runs use the same SAE, trainer settings and number of steps; the only difference is the
data provider: `mechflow.dictionaries.data.ActivationStream` (shuffle buffer over Parquet
shards, optional prefetch thread) or `in_memory_stream` over the same rows already in RAM.
Each variant runs `--repeats` times alternately; the best time of each is reported.

    python benchmarks/sae_training.py --manifest results/harvest/.../_manifest.json --out bench.json
    python benchmarks/sae_training.py --synthetic-rows 65536 --out bench.json   # no harvest needed
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mechflow.dictionaries.config import SAEConfig
from mechflow.dictionaries.data import ActivationStream, ShardSource, in_memory_stream, load_manifest
from mechflow.dictionaries.sae import build_training_sae

log = logging.getLogger("benchmarks.sae_training")


def synthetic_manifest(folder: Path, rows: int, d: int, seed: int = 0) -> Path:
    """Write `rows` random activations as harvest-layout shards (for runs without a harvest)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mechflow.contracts.filenames import SHARD_MANIFEST, SHARD_PATTERN
    from mechflow.contracts.models import HarvestManifest, ShardInfo
    from mechflow.contracts.parquet import activations_schema
    from mechflow.io import sha256_file

    T, per_shard = 128, 8192
    rng = np.random.default_rng(seed)
    shards = []
    for i, start in enumerate(range(0, rows, per_shard)):
        n = min(per_shard, rows - start)
        acts = rng.normal(size=(n, d)).astype(np.float32)
        ctx = (start + np.arange(n)) // T
        table = pa.table({"context_id": pa.array(ctx.astype(np.int64)),
                          "position": pa.array(((start + np.arange(n)) % T).astype(np.int32)),
                          "token_id": pa.array(np.zeros(n, np.int32)),
                          "activation": pa.FixedSizeListArray.from_arrays(pa.array(acts.reshape(-1)), d)},
                         schema=activations_schema(d))
        name = SHARD_PATTERN.format(index=i)
        pq.write_table(table, folder / name, row_group_size=2048)
        shards.append(ShardInfo(file=name, rows=n, sha256=sha256_file(folder / name),
                                first_context=int(ctx[0]), last_context=int(ctx[-1])))
    m = HarvestManifest(model="synthetic", model_sha256=None, hook="synthetic", layer=None, d=d, dtype="float32",
                        context_size=T, prepend_bos=False, corpus_sha256="0" * 64, n_contexts=rows // T,
                        n_rows=rows, shards=shards, config_hash="synthetic")
    (folder / SHARD_MANIFEST).write_text(m.model_dump_json())
    return folder / SHARD_MANIFEST


def run_once(cfg: SAEConfig, d: int, provider, steps: int) -> float:
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae = build_training_sae(cfg, d)
    tcfg = SAETrainerConfig(total_training_samples=steps * cfg.data.batch_size,
                            train_batch_size_samples=cfg.data.batch_size, lr=cfg.lr, lr_end=cfg.lr / 10,
                            logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=2)
    trainer = SAETrainer(tcfg, sae, provider)
    next(provider)  # pay any first-group load before the clock, for both providers alike
    t0 = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", type=Path, help="harvest _manifest.json (default: synthetic shards)")
    ap.add_argument("--synthetic-rows", type=int, default=65536)
    ap.add_argument("--d", type=int, default=576, help="width of synthetic activations")
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--buffer-rows", type=int, default=32768)
    ap.add_argument("--chunk-rows", type=int, default=1024)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        manifest = args.manifest or synthetic_manifest(Path(tmp), args.synthetic_rows, args.d)
        man, _ = load_manifest(manifest)
        cfg = SAEConfig(hook=None, d_sae=args.d_sae, k=args.k, normalize_activations="none",
                        data={"batch_size": args.batch_size})
        src = ShardSource([manifest], exclude_bos=True)
        all_rows = torch.from_numpy(np.concatenate([a for a, _ in src.iter_sequential(8192)]))
        results: dict[str, list[float]] = {"parquet": [], "memory": []}
        for r in range(args.repeats):
            mem = in_memory_stream(all_rows, args.batch_size, seed=r)
            results["memory"].append(run_once(cfg, man.d, mem, args.steps))
            stream = ActivationStream(ShardSource([manifest], exclude_bos=True), batch_size=args.batch_size,
                                      buffer_rows=args.buffer_rows, chunk_rows=args.chunk_rows, seed=r,
                                      prefetch=args.prefetch)
            results["parquet"].append(run_once(cfg, man.d, stream, args.steps))
            stream.close()
            log.info("repeat %d: memory %.2f s, parquet %.2f s", r, results["memory"][-1], results["parquet"][-1])
    tokens = args.steps * args.batch_size
    best = {k: min(v) for k, v in results.items()}
    out = {
        "benchmark": "sae_training", "manifest": str(args.manifest) if args.manifest else "synthetic",
        "d_in": man.d, "d_sae": args.d_sae, "k": args.k, "batch_size": args.batch_size, "steps": args.steps,
        "torch_threads": args.threads, "buffer_rows": args.buffer_rows, "chunk_rows": args.chunk_rows,
        "prefetch": args.prefetch, "seconds": results,
        "tokens_per_second_parquet": tokens / best["parquet"], "tokens_per_second_memory": tokens / best["memory"],
        "parquet_over_memory": best["memory"] / best["parquet"], "target": 0.9,
    }
    out["meets_target"] = out["parquet_over_memory"] >= 0.9
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    log.info("parquet %.0f tok/s, memory %.0f tok/s, ratio %.3f", out["tokens_per_second_parquet"],
             out["tokens_per_second_memory"], out["parquet_over_memory"])


if __name__ == "__main__":
    main()
