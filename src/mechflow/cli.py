"""The ``mechflow`` command. Sub-commands:

* ``mechflow plan [OVERRIDE ...]``: time, peak memory and disk of a run's token-scaled stages
  (harvest, SAE, transcoders), estimated from measured per-token costs (`mechflow.plan`) for the
  model and sizes the composed config names (the same Hydra overrides as
  ``snakemake --config overrides=...``); ``--model`` sizes it for another model (a preset, e.g.
  ``Llama-3.1-8B``, or a local folder with a ``config.json``); ``--table`` prints the table from
  135M to 70B parameters of docs/plan.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mechflow.errors import MechflowError


def _shape(args, cfg: dict):
    from mechflow.plan.shapes import preset, shape_for_model_cfg

    if args.model:
        shape = shape_for_model_cfg({"name": args.model})
        return shape if shape is not None else preset(args.model)
    shape = shape_for_model_cfg(cfg["model"])
    if shape is None:
        from mechflow.errors import ConfigError

        raise ConfigError(f"plan: the shape of model.name={cfg['model']['name']!r} is not known before loading it; "
                          "pass --model with a preset name or a local folder holding its config.json")
    return shape


def plan_command(args) -> int:
    from mechflow.config import compose_config
    from mechflow.plan import load_costs
    from mechflow.plan.report import duration, size
    from mechflow.plan.run import run_estimates

    costs = load_costs(args.costs)
    if args.table:
        from mechflow.plan.report import preset_table

        print(preset_table(costs, tokens=args.tokens or 1_000_000))
        return 0
    if args.points:
        from mechflow.plan.report import points_table

        print(points_table(costs))
        return 0
    overrides = list(args.overrides) + ([f"corpus.max_tokens={args.tokens}"] if args.tokens else [])
    cfg = compose_config(overrides)
    shape = _shape(args, cfg)
    rows = run_estimates(cfg, shape, costs)
    if args.json:
        print(json.dumps({"model": shape.as_dict(), "costs": {"commit": costs.commit, "measured_on": costs.measured_on,
                                                              "machine": costs.machine},
                          "stages": [{"stage": r.stage, "seconds": r.seconds, "peak_mb": r.peak_mb,
                                      "disk_bytes": r.disk_bytes, **r.detail} for r in rows]}, indent=2))
        return 0
    print(f"{shape.name}: {shape.params / 1e6:,.1f}M parameters, {shape.n_layers} layers, d_model {shape.d_model}, "
          f"d_mlp {shape.d_mlp}")
    print(f"costs measured at commit {costs.commit} on {costs.measured_on} ({costs.machine}, {costs.threads} torch "
          f"thread): forward {costs.forward_flops_per_s / 1e9:.1f} GFLOP/s, training "
          f"{costs.training_flops_per_s / 1e9:.1f} GFLOP/s")
    print(f"{'stage':<18}{'time':>10}{'peak memory':>14}{'disk':>10}   arithmetic")
    for r in rows:
        print(f"{r.stage:<18}{duration(r.seconds):>10}{size(r.peak_mb * 1024 * 1024):>14}{size(r.disk_bytes):>10}"
              f"   {_arithmetic(r)}")
    print("times on this machine's cores at the measured rate; cluster requests (mem_mb, runtime) are "
          "1.5 x memory + 1 GB and 2 x time + 10 min (mechflow.workflow.resources)")
    return 0


def _arithmetic(r: Any) -> str:
    d = r.detail
    if r.stage == "harvest":
        return (f"{d['forward_flops_per_token'] / 1e6:.0f} MFLOP/token to block {d['stop_layer']}, "
                f"{d['stored_values_per_token']} stored values/token, weights {d['weights_mb']:.0f} MB")
    jobs = f", {d['jobs']} job(s)" if "jobs" in d else ""
    return f"{d['flops_per_token'] / 1e6:.1f} MFLOP/token, {d['n_params'] / 1e6:.1f}M parameters{jobs}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mechflow", description="mechflow command-line tools")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="estimate time, memory and disk of a run from measured per-token costs")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as in snakemake --config overrides=...")
    p.add_argument("--model", help="size for this model instead: a preset (e.g. Llama-3.1-8B) or a local "
                   "folder with config.json")
    p.add_argument("--tokens", type=int, help="corpus tokens (corpus.max_tokens)")
    p.add_argument("--costs", help="a measured_costs.json (benchmarks/costs.py); default: the reference machine's")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--table", action="store_true", help="the preset table from 135M to 70B (docs/plan.md)")
    p.add_argument("--points", action="store_true", help="the measured points beside their estimates (docs/plan.md)")
    args = ap.parse_args(argv)
    try:
        return plan_command(args)
    except MechflowError as exc:
        print(f"mechflow {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
