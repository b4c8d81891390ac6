"""Benchmark ACDC (and EAP / EAP-IG on the same restricted graph) on SmolLM2-135M IOI.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/acdc.py --out results/benchmark/acdc_timings.json \
        [--prompts 16] [--last-layers 2] [--sender-last-layers 4] [--components all] \
        [--thresholds 0.003 0.03 0.3] [--speculation 1 8] [--metric kl] [--no-eap]

Builds the IOI dataset with ``mechflow.tasks.prepare_task`` into a temp folder, takes the first
``--prompts`` pairs of its largest equal-length bucket, and measures per tau: ACDC wall time,
batched forwards, candidate evaluations (used and wasted by speculation), seconds per edge
decided by evaluation; the cost of one naive full edge-patched forward (`CircuitEvaluator`, what a
brute-force ACDC pays per edge); EAP and EAP-IG times; and the exact faithfulness (task metric) of
the ACDC circuit and of the EAP-IG top-k circuit of the same size within the restriction.
Anchor (from the task brief, not measured here): auto-circuit's ACDC ~ 3.3 s per edge evaluation
on SmolLM2 with 16 IOI pairs.

Cross-check with auto-circuit 1.0.1 (needs its own venv; it imports TransformerLens < 3 APIs):
    python benchmarks/acdc.py --out /tmp/x.json --crosscheck-autocircuit /tmp/acdc-venv/bin/python
builds a tiny random llama (float64, no GQA: auto-circuit splits q/k/v per head without KV
groups), runs auto-circuit's ``acdc_prune_scores`` in that venv (``--autocircuit-worker``, a
subprocess) with its edges ordered as mechflow's ACDC visits them, and compares edge sets per tau.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

if "--autocircuit-worker" in sys.argv:  # runs in auto-circuit's venv: no mechflow imports
    from types import SimpleNamespace

    def _worker(inp: Path, out: Path) -> None:
        from auto_circuit.prune_algos.ACDC import acdc_prune_scores
        from auto_circuit.utils.graph_utils import patchable_model
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        data = torch.load(inp)
        cfg = HookedTransformerConfig(**{**data["cfg"], "dtype": getattr(torch, data["cfg"]["dtype"])})
        model = HookedTransformer(cfg, move_to_device=False)
        missing = model.load_state_dict(data["state_dict"], strict=False).missing_keys
        assert not [k for k in missing if k in dict(model.named_parameters())], missing
        with torch.no_grad():  # same function under both TransformerLens versions
            assert torch.allclose(model(data["clean"]), data["expected_logits"], rtol=0, atol=1e-10)
        model.cfg.use_attn_result = model.cfg.use_split_qkv_input = model.cfg.use_hook_mlp_in = True
        model.setup()
        model.eval()
        pm = patchable_model(model, factorized=True, slice_output="last_seq", separate_qkv=True,
                             device=torch.device("cpu"))
        rank = {name: i for i, name in enumerate(data["edge_order"])}
        edges = [e for e in pm.edges if f"{e.src.name}->{e.dest.name}" in rank]
        assert len(edges) == len(rank) == len(pm.edges), (len(edges), len(rank), len(pm.edges))
        pm.edges = sorted(edges, key=lambda e: rank[f"{e.src.name}->{e.dest.name}"])
        batch = SimpleNamespace(clean=data["clean"], corrupt=data["corrupted"], key=0)
        res = {}
        for base, exp in data["taus"]:
            t0 = time.perf_counter()
            scores = acdc_prune_scores(pm, [batch], None, tao_exps=[exp], tao_bases=[base])
            kept = [f"{e.src.name}->{e.dest.name}" for e in pm.edges
                    if bool(torch.isinf(scores[e.dest.module_name][e.patch_idx]))]
            res[repr(base * 10 ** exp)] = {"kept": kept, "seconds": time.perf_counter() - t0}
        Path(out).write_text(json.dumps(res))

    i = sys.argv.index("--autocircuit-worker")
    _worker(Path(sys.argv[i + 1]), Path(sys.argv[i + 2]))
    sys.exit(0)

from mechflow.benchmark.acdc import Acdc
from mechflow.benchmark.config import AcdcConfig, RestrictionConfig
from mechflow.benchmark.core import select_batch
from mechflow.benchmark.restriction import EdgeRestriction
from mechflow.circuits.eap import edge_scores
from mechflow.circuits.faithfulness import CircuitEvaluator, prefix_mask
from mechflow.circuits.graph import EdgeGraph
from mechflow.config import DEFAULT_CONFIG_DIR
from mechflow.io import atomic_write_json
from mechflow.models import load_model_from_cfg
from mechflow.tasks import TaskDataset, prepare_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--last-layers", type=int, default=2)
    ap.add_argument("--sender-last-layers", type=int, default=4)
    ap.add_argument("--components", default="all")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.003, 0.03, 0.3])
    ap.add_argument("--speculation", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--metric", default="kl")
    ap.add_argument("--no-eap", action="store_true")
    ap.add_argument("--crosscheck-autocircuit", metavar="PYTHON", help="auto-circuit venv's python")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.crosscheck_autocircuit:
        return crosscheck_autocircuit(args.crosscheck_autocircuit, args.out)

    model_cfg = yaml.safe_load((DEFAULT_CONFIG_DIR / "model" / "smollm2_135m.yaml").read_text())
    lm = load_model_from_cfg(model_cfg)
    task_cfg = yaml.safe_load((DEFAULT_CONFIG_DIR / "task" / "ioi.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dataset.jsonl"
        prepare_task(task_cfg, model_cfg=model_cfg, dataset=path, tokenizer=lm.tokenizer)
        batch = select_batch(TaskDataset.load(path), args.prompts, path)
    model, graph = lm.model, EdgeGraph.from_cfg(lm.model.cfg)
    restriction = EdgeRestriction.build(graph, RestrictionConfig(
        last_layers=args.last_layers, sender_last_layers=args.sender_last_layers, components=args.components))
    res = {"model": model_cfg["name"], "task": "ioi", "n_prompts": len(batch),
           "n_pos": int(batch.clean_tokens.shape[1]), "torch_threads": torch.get_num_threads(),
           "restriction": vars(restriction.spec),
           "n_edges_total": graph.n_edges, "n_edges_restricted": restriction.n_edges, "metric": args.metric,
           "anchor_autocircuit_seconds_per_edge": 3.3, "acdc": []}

    ev = CircuitEvaluator(model, batch, graph)
    t0 = time.perf_counter()
    for _ in range(3):
        ev.metric(graph.valid)
    res["naive_full_forward_eval_seconds"] = (time.perf_counter() - t0) / 3

    if not args.no_eap:
        for method, steps in (("eap", 1), ("eap-ig", 5)):
            t0 = time.perf_counter()
            scores = edge_scores(model, batch, method, steps=steps, graph=graph)
            res[f"{method}_seconds"] = time.perf_counter() - t0
        order = restriction.ranked(scores)  # EAP-IG ranking within the restriction

    for spec in args.speculation:
        t0 = time.perf_counter()
        acdc = Acdc(model, batch, AcdcConfig(metric=args.metric, speculation=spec), restriction)
        setup = time.perf_counter() - t0
        for tau in args.thresholds:
            run = acdc.run(tau, progress=True)
            n_eval_used = sum(s.evaluated for s in run.steps)
            row = {"speculation": spec, "threshold": tau, "setup_seconds": setup, "seconds": run.seconds,
                   "n_kept": run.n_kept, "n_forward": run.n_forward, "n_evaluations": run.n_evaluations,
                   "n_wasted": run.n_wasted, "n_decided_by_evaluation": n_eval_used,
                   "n_pruned_dead": len(run.steps) - n_eval_used,
                   "seconds_per_evaluated_edge": run.seconds / max(1, n_eval_used),
                   "seconds_per_forward": run.seconds / max(1, run.n_forward), "final_metric": run.metric,
                   "f_acdc": ev.faithfulness(restriction.full_kept(run.kept))}
            if not args.no_eap:
                top = prefix_mask(order, run.n_kept, graph)
                row["f_eap_ig_same_size"] = ev.faithfulness(restriction.full_kept(top))
                row["jaccard_acdc_vs_eap_ig"] = int((top & run.kept).sum()) / max(1, int((top | run.kept).sum()))
            res["acdc"].append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    atomic_write_json(args.out, res)
    _table(res)


def _ac_name(name: str) -> str:
    """mechflow node/receiver name -> auto-circuit node name."""
    if name == "input":
        return "Resid Start"
    if name == "logits":
        return "Resid End"
    if name.startswith("m"):
        return f"MLP {name[1:]}"
    layer, rest = name[1:].split(".h")
    head, _, kind = rest.partition("<")
    return f"A{layer}.{head}" + (f".{kind[0].upper()}" if kind else "")


def crosscheck_autocircuit(python: str, out: Path, seed: int = 0, n: int = 4, pos: int = 6) -> dict:
    """Same tiny model, prompts and edge order in auto-circuit's ACDC and ours; edge-set agreement."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from mechflow.attribution.patching import TokenPairs
    from mechflow.benchmark.acdc import receiver_order

    cfg = {"n_layers": 2, "d_model": 32, "d_head": 8, "n_heads": 4, "d_mlp": 64, "d_vocab": 50, "n_ctx": 64,
           "act_fn": "silu", "normalization_type": "RMS", "positional_embedding_type": "rotary", "rotary_dim": 8,
           "gated_mlp": True, "final_rms": True, "original_architecture": "LlamaForCausalLM", "seed": seed,
           "dtype": torch.float64, "default_prepend_bos": False}
    model = HookedTransformer(HookedTransformerConfig(**cfg), move_to_device=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # as tests/conftest.py: far from linear
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
            elif "w" in name.split(".")[-1].lower():
                p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)
    model.eval()
    clean, corrupted = torch.randint(0, 50, (n, pos), generator=gen), torch.randint(0, 50, (n, pos), generator=gen)
    batch = TokenPairs(clean, corrupted, lambda logits: logits[:, -1, 0])
    graph = EdgeGraph.from_cfg(model.cfg)
    order = [graph.edge_name(s, r) for r in receiver_order(graph)
             for s in reversed(range(graph.n_senders)) if graph.valid[s, r]]
    ac_order = ["->".join(_ac_name(x) for x in e.split("->")) for e in order]
    taus = [(3, -3), (1, -2), (3, -2), (1, -1), (3, -1)]
    res = {"model": "tiny llama 2x4 heads, d_model 32, float64, no GQA", "n_prompts": n, "n_pos": pos,
           "n_edges": graph.n_edges, "taus": {}}
    with tempfile.TemporaryDirectory() as tmp:
        cfg_saved = {k: (str(v).replace("torch.", "") if k == "dtype" else v) for k, v in cfg.items()}
        cfg_saved["dtype"] = "float64"
        with torch.no_grad():
            expected = model(clean)
        torch.save({"cfg": cfg_saved, "state_dict": dict(model.named_parameters()), "expected_logits": expected,
                    "clean": clean, "corrupted": corrupted,
                    "edge_order": ac_order, "taus": taus}, Path(tmp) / "in.pt")
        proc = subprocess.run([python, __file__, "--autocircuit-worker", str(Path(tmp) / "in.pt"),
                               str(Path(tmp) / "out.json")], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"auto-circuit worker failed:\n{proc.stderr[-4000:]}")
        theirs = json.loads((Path(tmp) / "out.json").read_text())
    back = dict(zip(ac_order, order))
    for prune_dead in (False, True):
        acdc = Acdc(model, batch, AcdcConfig(prune_dead=prune_dead))
        for base, exp in taus:
            tau = base * 10 ** exp
            ours = set(graph.edge_names(acdc.run(tau).kept))
            ac = {back[e] for e in theirs[repr(tau)]["kept"]}
            row = res["taus"].setdefault(repr(tau), {"autocircuit_kept": len(ac),
                                                     "autocircuit_seconds": theirs[repr(tau)]["seconds"]})
            key = "prune_dead" if prune_dead else "no_prune_dead"
            row[key] = {"mechflow_kept": len(ours), "both": len(ours & ac), "only_mechflow": len(ours - ac),
                        "only_autocircuit": len(ac - ours), "identical": ours == ac,
                        "jaccard": len(ours & ac) / max(1, len(ours | ac))}
    atomic_write_json(out, res)
    print(json.dumps(res, indent=1))
    return res


def _table(res: dict) -> None:
    print(f"\nSmolLM2 IOI, {res['n_prompts']} prompts x {res['n_pos']} tokens, restriction {res['restriction']}: "
          f"{res['n_edges_restricted']} of {res['n_edges_total']} edges; metric {res['metric']}")
    print(f"naive full edge-patched forward: {res['naive_full_forward_eval_seconds']:.3f} s; "
          + (f"EAP {res['eap_seconds']:.2f} s, EAP-IG(5) {res['eap-ig_seconds']:.2f} s"
             if "eap_seconds" in res else ""))
    cols = ["speculation", "threshold", "seconds", "n_kept", "n_forward", "n_evaluations", "n_wasted",
            "n_pruned_dead", "seconds_per_evaluated_edge", "f_acdc", "f_eap_ig_same_size"]
    print(" | ".join(cols))
    for row in res["acdc"]:
        print(" | ".join(f"{row.get(c, float('nan')):.4g}" if isinstance(row.get(c), float) else str(row.get(c, "-"))
                         for c in cols))


if __name__ == "__main__":
    main()
