"""A TransformerLens forward of SmolLM2 with its linear weights re-strided (`linear_weight_layout`, as
`mechflow.models.load_model` returns it) versus row-major (as TransformerLens builds it), in one run.

    python benchmarks/forward_layout.py --out results/benchmarks/forward_layout.json [--threads 1] [--repeats 5]

TL 3's gated MLP and unembedding call ``F.linear(x, W.T.contiguous())`` on every forward; with
row-major weights that is a copy of every MLP and unembedding matrix per forward. Measures seconds per
forward (best of --repeats, after a warm-up) for one token (a generation step), 1 x 64 and 8 x 64 tokens,
both layouts on the same model object and inputs, and checks the logits are bit-identical.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _time(model, tokens, repeats: int) -> float:
    with torch.inference_mode():
        model(tokens)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(tokens)
            best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from mechflow.models.registry import LINEAR_WEIGHTS
    from mechflow.testing import load_configured_model

    model = load_configured_model("smollm2_135m").model
    weights = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in LINEAR_WEIGHTS]
    gen = torch.Generator().manual_seed(0)
    shapes = {"1x1": (1, 1), "1x64": (1, 64), "8x64": (8, 64)}
    rows = {}
    for label, shape in shapes.items():
        tokens = torch.randint(100, model.cfg.d_vocab, shape, generator=gen)
        with torch.inference_mode():
            fast_logits = model(tokens)
        fast = _time(model, tokens, args.repeats)
        saved = [p.data for p in weights]
        for p in weights:
            p.data = p.data.contiguous()  # row-major, as TransformerLens builds it
        try:
            with torch.inference_mode():
                same = torch.equal(model(tokens), fast_logits)
            slow = _time(model, tokens, args.repeats)
        finally:
            for p, data in zip(weights, saved):
                p.data = data
        rows[label] = {"row_major_s": slow, "restrided_s": fast, "speedup": slow / fast, "bit_identical": same}
        print(f"{label}: row-major {slow * 1e3:.1f} ms, re-strided {fast * 1e3:.1f} ms, x{slow / fast:.2f}, "
              f"bit-identical {same}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "shapes": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
