"""Measure the per-token costs `mechflow plan` extrapolates from, and peak RSS at 1×, 4×, 10× tokens.

    python benchmarks/costs.py --out results/benchmarks/measured_costs.json [--threads 1] [--work DIR]

Every measurement runs the real stage (corpus, harvest, SAE training) or TransformerLens forwards on
SmolLM2 in its own child process (peak RSS = that child's ru_maxrss); see `mechflow.plan.measure` for
what is fitted from what. Writes a `MeasuredCosts` document; `mechflow plan --costs FILE` reads it.
The package ships the reference machine's file (src/mechflow/plan/data/measured_costs.json): copy a
new measurement there to change the defaults, and update docs/plan.md (`python benchmarks/costs.py
--plot docs/figures/rss_scaling.png --out ...` draws the scaling figure).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from mechflow.contracts.documents import write_document
from mechflow.contracts.plan import MeasuredCosts
from mechflow.plan.measure import measure
from mechflow.plan.plots import rss_scaling_figure


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--multiples", type=int, nargs="*", default=[1, 4, 10],
                    help="corpus sizes of the scaling series, in units of 100,000 tokens (none: skip it)")
    ap.add_argument("--plot", type=Path, default=None, help="also draw the peak-RSS scaling figure here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mechflow-costs-") as tmp:
        doc = measure(args.work or Path(tmp), threads=args.threads, multiples=tuple(args.multiples),
                      log=lambda s: print(s, flush=True))
    write_document(args.out, MeasuredCosts, doc)
    print(f"wrote {args.out}")
    if args.plot:
        rss_scaling_figure(MeasuredCosts.model_validate(doc), args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
