"""The table of docs/plan.md: one scenario sized for every preset from 135M to 70B parameters."""

from __future__ import annotations

from mechflow.contracts.plan import MeasuredCosts
from mechflow.plan.estimate import harvest_estimate, loaded_weight_bytes, training_estimate
from mechflow.plan.shapes import PRESETS

EXPANSION = 8  # d_sae = 8 x d_model, as the default SAE


def duration(seconds: float) -> str:
    """Seconds as a short human duration (s, min, h, d)."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def size(n_bytes: float) -> str:
    """Bytes as a short human size (kB, MB, GB, TB)."""
    for unit, factor in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n_bytes >= factor:
            return f"{n_bytes / factor:.1f} {unit}"
    return f"{n_bytes / 1e3:.0f} kB"


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f}" if n_bytes < 1e11 else f"{n_bytes / 1e9:.0f}"


def preset_table(costs: MeasuredCosts, *, tokens: int = 1_000_000, ctx: int = 128) -> str:
    """Markdown: harvest of the middle layer's residual stream and one SAE (8 × d_model) on `tokens`."""
    head = (f"Scenario: {tokens:,} tokens in contexts of {ctx}; harvest `resid_post` of the middle layer "
            f"(block L/2, so the forward stops after L/2 + 1 blocks); one TopK SAE of width {EXPANSION} × d_model "
            f"trained on the same {tokens:,} tokens (batch 2048, shuffle buffer 65,536 rows). Rates measured at "
            f"commit {costs.commit} on {costs.measured_on} ({costs.machine}, {costs.threads} torch thread): forward "
            f"{costs.forward_flops_per_s / 1e9:.1f} GFLOP/s, training {costs.training_flops_per_s / 1e9:.1f} GFLOP/s "
            f"+ {costs.training_seconds_per_token * 1e6:.0f} µs/token, {costs.write_seconds_per_value * 1e9:.1f} ns "
            f"and {costs.stored_bytes_per_value:.2f} B per stored value.\n\n")
    rows = ["| model | parameters | weights (GB, fp32) | forward to L/2+1 (GFLOP/token) | harvest time | "
            "harvest disk (GB) | harvest peak RAM (GB) | SAE time | SAE peak RAM (GB) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for shape in PRESETS.values():
        mid = shape.n_layers // 2
        h = harvest_estimate(shape, costs, tokens=tokens, hooks=[f"blocks.{mid}.hook_resid_post"], ctx=ctx,
                             batch_size=8, shard_rows=12800)
        s = training_estimate(costs, stage="train_sae", tokens=tokens, d_in=shape.d_model,
                              d_sae=EXPANSION * shape.d_model, buffer_rows=65536, batch_size=2048)
        rows.append(f"| {shape.name} | {shape.params / 1e9:.2f} B | {_gb(loaded_weight_bytes(shape))} | "
                    f"{h.detail['forward_flops_per_token'] / 1e9:.2f} | {duration(h.seconds)} | {_gb(h.disk_bytes)} | "
                    f"{h.peak_mb / 1024:.1f} | {duration(s.seconds)} | {s.peak_mb / 1024:.1f} |")
    return head + "\n".join(rows) + "\n"


def points_table(costs: MeasuredCosts) -> str:
    """Markdown: every measured harvest and training point beside its estimate from the fitted rates."""
    from mechflow.plan.shapes import preset

    shape = preset(costs.model)
    rows = ["| run | tokens | time measured | time estimated | peak RSS measured (MB) | peak RSS estimated (MB) | "
            "disk measured (MB) | disk estimated (MB) |", "|---|---|---|---|---|---|---|---|"]
    for p in costs.harvest:
        est = harvest_estimate(shape, costs, tokens=p.tokens, hooks=p.hooks, ctx=costs.context_size, batch_size=8,
                               shard_rows=p.shard_rows)
        rows.append(f"| harvest to block {p.stop_layer}, {len(p.hooks)} hooks | {p.tokens:,} | {p.seconds:.1f} s | "
                    f"{est.seconds:.1f} s | {p.peak_rss_mb:.0f} | {est.peak_mb:.0f} | {p.disk_bytes / 1e6:.1f} | "
                    f"{est.disk_bytes / 1e6:.1f} |")
    for p in costs.training:
        est = training_estimate(costs, stage="train_sae", tokens=p.tokens, d_in=p.d_in, d_sae=p.d_sae,
                                buffer_rows=65536, batch_size=2048)
        rows.append(f"| SAE d_sae {p.d_sae} on a {p.corpus_tokens:,}-token harvest | {p.tokens:,} | "
                    f"{p.seconds:.1f} s | {est.seconds:.1f} s | {p.peak_rss_mb:.0f} | {est.peak_mb:.0f} | — | — |")
    return "\n".join(rows) + "\n"
