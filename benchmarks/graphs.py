"""Benchmark the attribution graph of one prompt on SmolLM2-135M: time and peak memory against plain
forward+backward passes of the model, and their scaling with prompt length.

Usage: python benchmarks/graphs.py --out results/benchmarks/graphs.json
       [--set results/<run>/dictionaries/transcoder_set] [--lengths 8 16 32 64] [--threads 1]
       [--max-feature-nodes 4096 [1024 ...]]

With ``--set``, the trained transcoder set of a run (its layer_<l>/ folders); without it, random
per-layer transcoders of the default width (d_sae 4608) whose thresholds are set per layer so that
about ``--l0`` features fire per token on the benchmark prompt (the cost of a graph grows with the
number of active features, not with their meaning). Printed and written: for each prompt length,
the graph's wall time, the time of one plain forward+backward pass of the same prompt, their
ratio ("the graph costs N forward+backward passes"), the number of active features / feature
nodes / backward passes, the peak RSS above the loaded model (sampled every 5 ms), and the
graph's replacement and completeness scores (unpruned and pruned, `mechflow.graphs.influence`):
with a trained set, what a smaller feature budget costs in quality. Several
``--max-feature-nodes`` give one row per (length, budget). The figure ``graphs_scaling.png``
beside the JSON plots time and memory against length (at the first budget).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from circuits import RssPeak  # the RSS sampler of the circuits benchmark (benchmarks/ is on sys.path)

from mechflow.graphs.attribution import attribute_prompt
from mechflow.graphs.influence import graph_scores, prune_graph
from mechflow.graphs.replacement import LayerTranscoder, TranscoderSet
from mechflow.graphs.stage import pruned_adjacency
from mechflow.io import atomic_write_json
from mechflow.models import load_model

TEXT = ("When Mary and John went to the store, John gave a drink to Mary. Afterwards Mary and John walked home "
        "along the river, talking about the books they had read and the places they wanted to visit next summer "
        "with their friends from school and work")


def random_set(model, tokens: torch.Tensor, d_sae: int, l0: float, seed: int = 0) -> TranscoderSet:
    """Random transcoders with per-layer thresholds giving about ``l0`` active features per token."""
    g = torch.Generator().manual_seed(seed)
    d = model.cfg.d_model
    _, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n.endswith("ln2.hook_normalized"))
    layers = {}
    for layer in range(model.cfg.n_layers):
        W_enc = torch.randn(d, d_sae, generator=g) / d ** 0.5
        pre = cache[f"blocks.{layer}.ln2.hook_normalized"][0] @ W_enc
        q = 1 - l0 / d_sae
        threshold = torch.quantile(pre[1:].flatten(), q).clamp(min=1e-3).expand(d_sae).clone()
        layers[layer] = LayerTranscoder(W_enc, torch.zeros(d_sae), threshold,
                                        torch.randn(d_sae, d, generator=g) * 0.01, torch.zeros(d))
    return TranscoderSet(layers)


def plain_fwd_bwd(model, tokens: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward + backward pass (gradients of every weight) on ``tokens``."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(True)
    try:
        return _timed_fwd_bwd(model, tokens, repeats)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _timed_fwd_bwd(model, tokens: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits = model(tokens[None])
        logits[0, -1].logsumexp(-1).backward()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--set", type=Path, default=None, help="a run's dictionaries/transcoder_set folder")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-feature-nodes", type=int, nargs="+", default=[4096])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--l0", type=float, default=64.0)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("smollm2_135m")
    model = lm.model
    ids = lm.to_tokens(TEXT)[0]
    if args.set is not None:
        folders = sorted(args.set.glob("layer_*"), key=lambda p: int(p.name.split("_")[1]))
        transcoders = TranscoderSet.from_folders(folders)
        source = str(args.set)
    else:
        transcoders = random_set(model, ids[: max(args.lengths)], args.d_sae, args.l0)
        source = f"random per-layer transcoders, d_sae {args.d_sae}, thresholds for L0 ~ {args.l0}"
    rows = []
    for n in args.lengths:
        tokens = ids[:n]
        with torch.enable_grad():
            base = plain_fwd_bwd(model, tokens, args.repeats)
        for budget in args.max_feature_nodes:
            with RssPeak() as rss:
                t0 = time.perf_counter()
                graph = attribute_prompt(model, transcoders, tokens, batch_size=args.batch_size,
                                         max_feature_nodes=budget, bos_token_id=lm.card.bos_token_id)
                seconds = time.perf_counter() - t0
            layout, p = graph.layout, graph.logit_probabilities
            pruned = prune_graph(graph.adjacency, layout, p)
            scores = graph_scores(graph.adjacency, layout, p) + graph_scores(
                pruned_adjacency(graph, pruned.node_mask, pruned.edge_mask), layout, p)
            n_rows = layout.n_features + layout.n_logits
            rows.append({"tokens": n, "max_feature_nodes": budget, "graph_seconds": round(seconds, 3),
                         "fwd_bwd_seconds": round(base, 4), "graph_over_fwd_bwd": round(seconds / base, 1),
                         "active_features": int(len(graph.active_features)), "feature_nodes": layout.n_features,
                         "backward_passes": -(-n_rows // args.batch_size),
                         "peak_rss_above_model_mb": round(rss.above_mb, 1),
                         "replacement": round(scores[0], 4), "completeness": round(scores[1], 4),
                         "pruned_replacement": round(scores[2], 4), "pruned_completeness": round(scores[3], 4)})
            print(f"{n:3d} tokens, budget {budget}: graph {seconds:7.2f} s = {seconds / base:7.1f} x one "
                  f"forward+backward ({base * 1000:.1f} ms); {rows[-1]['active_features']} active features, "
                  f"{layout.n_features} nodes; peak RSS +{rss.above_mb:.0f} MB; replacement / completeness "
                  f"{scores[0]:.3f} / {scores[1]:.3f} (pruned {scores[2]:.3f} / {scores[3]:.3f})", flush=True)
    result = {"model": "smollm2_135m", "threads": args.threads, "transcoders": source,
              "max_feature_nodes": args.max_feature_nodes, "batch_size": args.batch_size, "rows": rows,
              "torch": torch.__version__}
    atomic_write_json(args.out, result)
    _plot([r for r in rows if r["max_feature_nodes"] == args.max_feature_nodes[0]],
          args.out.with_name("graphs_scaling.png"))
    print(json.dumps(result, indent=1))


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    n = [r["tokens"] for r in rows]
    a.plot(n, [r["graph_seconds"] for r in rows], "o-")
    a.set_xlabel("prompt tokens")
    a.set_ylabel("graph wall time (s)")
    b.plot(n, [r["peak_rss_above_model_mb"] for r in rows], "o-", color="#f28e2b")
    b.set_xlabel("prompt tokens")
    b.set_ylabel("peak RSS above model (MB)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
