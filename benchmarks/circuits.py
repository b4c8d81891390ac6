"""Benchmark EAP / EAP-IG / exact circuit evaluation against plain passes on SmolLM2-135M.

Usage: python benchmarks/circuits.py --out results/benchmark/circuits_timings.json [--prompts 16]

Times (wall clock, median of --repeats): plain forward, plain forward+backward, EAP, EAP-IG
(5 steps), one exact circuit evaluation (top 5% EAP-IG edges), exact head patching, AP, IG-AP;
ratios to the plain passes; RSS above the loaded model (sampled every 5 ms) per phase.

The circuit evaluator unembeds only the last position when the metric reads nothing else (every
task metric); for a like-for-like view the JSON also holds a plain forward that unembeds only
the last position and the evaluation with every position unembedded, and their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

import psutil
import torch

from mechflow.attribution.gradients import (
    attribution_patching,
    integrated_gradients_patching,
)
from mechflow.attribution.patching import TokenPairs, exact_patching
from mechflow.circuits.eap import edge_scores
from mechflow.circuits.faithfulness import CircuitEvaluator, prefix_mask, ranked_edges
from mechflow.io import atomic_write_json
from mechflow.models import load_model

NAMES = [("Mary", "John", "Tom"), ("Alice", "Bob", "Kate"), ("Sarah", "David", "Paul"), ("Anna", "Mark", "Lucy"),
         ("Emma", "James", "Peter"), ("Laura", "Daniel", "Chris"), ("Lisa", "Michael", "George"),
         ("Rachel", "Steve", "Frank")]
PLACES = [("store", "a drink"), ("park", "a ball")]


def ioi_pairs(lm, n: int) -> TokenPairs:
    rows = [(io, s, c, p, o) for (io, s, c) in NAMES for (p, o) in PLACES][:n]
    clean = [f"When {io} and {s} went to the {p}, {s} gave {o} to" for io, s, c, p, o in rows]
    corr = [f"When {io} and {s} went to the {p}, {c} gave {o} to" for io, s, c, p, o in rows]

    def tid(w):
        return lm.tokenizer.encode(" " + w, add_special_tokens=False)[0]

    good = torch.tensor([tid(r[0]) for r in rows])
    bad = torch.tensor([tid(r[1]) for r in rows])

    def metric(logits):
        i = torch.arange(logits.shape[0])
        return logits[i, -1, good] - logits[i, -1, bad]

    return TokenPairs(lm.to_tokens(clean), lm.to_tokens(corr), metric)


class RssPeak:
    """Peak resident memory above a baseline while the block runs (5 ms sampling)."""

    def __enter__(self):
        self.proc, self.base, self.peak, self.stop = psutil.Process(), psutil.Process().memory_info().rss, 0, False
        self.t = threading.Thread(target=self._poll, daemon=True)
        self.t.start()
        return self

    def _poll(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop = True
        self.t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.above_mb = (self.peak - self.base) / 2**20


def timed(fn, repeats: int):
    times, mem = [], 0.0
    for _ in range(repeats):
        with RssPeak() as r:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        mem = max(mem, r.above_mb)
    return {"seconds": statistics.median(times), "all_seconds": times, "rss_above_start_mb": mem}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--node-methods", action="store_true", help="also time exact head patching, AP, IG-AP")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    lm = load_model("smollm2_135m")
    model, batch = lm.model, ioi_pairs(lm, args.prompts)
    rss_model_mb = psutil.Process().memory_info().rss / 2**20

    def fwd():
        with torch.no_grad():
            batch.metric(model(batch.clean_tokens)).mean()

    def fwd_last():
        with torch.no_grad():
            resid = model(batch.clean_tokens, stop_at_layer=model.cfg.n_layers)
            batch.metric(model.unembed(model.ln_final(resid[:, -1:]))).mean()

    def fwd_bwd():
        emb = model.embed(batch.clean_tokens).detach().requires_grad_(True)
        logits = model(emb, start_at_layer=0)
        torch.autograd.grad(batch.metric(logits).mean(), [emb])

    scores = edge_scores(model, batch, "eap-ig", steps=5)
    ev = CircuitEvaluator(model, batch)
    ev_all = CircuitEvaluator(model, batch, last_position_only=False)
    kept = prefix_mask(ranked_edges(scores, ev.graph), int(0.05 * ev.graph.n_edges), ev.graph)
    res = {
        "model": "smollm2_135m", "n_prompts": args.prompts, "n_pos": int(batch.clean_tokens.shape[1]),
        "n_edges": ev.graph.n_edges, "torch_threads": torch.get_num_threads(), "rss_model_mb": rss_model_mb,
        "forward": timed(fwd, args.repeats),
        "forward_last_position": timed(fwd_last, args.repeats),
        "forward_backward": timed(fwd_bwd, args.repeats),
        "eap": timed(lambda: edge_scores(model, batch, "eap"), args.repeats),
        "eap_ig_5": timed(lambda: edge_scores(model, batch, "eap-ig", steps=5), args.repeats),
        "exact_circuit_eval_top5pct": timed(lambda: ev.metric(kept), args.repeats),
        "exact_circuit_eval_empty": timed(lambda: ev.metric(torch.zeros_like(kept)), args.repeats),
        "exact_circuit_eval_top5pct_all_positions": timed(lambda: ev_all.metric(kept), args.repeats),
        "circuit_eval_last_position_only": ev.logit_positions is not None,
    }
    if args.node_methods:
        res["exact_head_patching"] = timed(lambda: exact_patching(model, batch, "head"), 1)
        res["ap_heads"] = timed(lambda: attribution_patching(model, batch, "head"), 1)
        res["ig_ap_heads_5"] = timed(lambda: integrated_gradients_patching(model, batch, "head", steps=5), 1)
    f, fb = res["forward"]["seconds"], res["forward_backward"]["seconds"]
    res["ratios"] = {
        "eap_over_fwd_bwd": res["eap"]["seconds"] / fb,
        "eap_ig_5_over_fwd_bwd": res["eap_ig_5"]["seconds"] / fb,
        "circuit_eval_over_fwd": res["exact_circuit_eval_top5pct"]["seconds"] / f,
        "circuit_eval_empty_over_fwd": res["exact_circuit_eval_empty"]["seconds"] / f,
        "circuit_eval_over_fwd_last_position": res["exact_circuit_eval_top5pct"]["seconds"]
        / res["forward_last_position"]["seconds"],
        "circuit_eval_all_positions_over_fwd": res["exact_circuit_eval_top5pct_all_positions"]["seconds"] / f,
    }
    atomic_write_json(args.out, res)
    print(json.dumps({k: (v["seconds"] if isinstance(v, dict) and "seconds" in v else v) for k, v in res.items()},
                     indent=1))


if __name__ == "__main__":
    main()
