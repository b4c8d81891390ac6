"""The plan of a composed run config: its token-scaled stages' estimates (`run_estimates`).

This module reads the stage groups through their typed configs (`CorpusConfig`, `HarvestConfig`,
`SAEConfig`, `TranscoderConfig`), which is why `mechflow.plan` sits above the stage packages in the
import layers (pyproject.toml); `mechflow plan` and `mechflow.workflow.resources` both call it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def run_estimates(cfg: Mapping[str, Any], shape: Any, costs: Any) -> list[Any]:
    """The plan's estimates of a composed run config's token-scaled stages: harvest, the SAE, the
    transcoder(s) of the `transcoder` group (one job; a CLT counts once). Groups are read through their
    typed configs, so a key a config leaves out takes the class default, as in the stages."""
    from mechflow.contracts.hooks import selected_hooks
    from mechflow.corpus.config import CorpusConfig
    from mechflow.dictionaries.config import SAEConfig, TranscoderConfig
    from mechflow.harvest.config import HarvestConfig
    from mechflow.plan.estimate import StageEstimate, harvest_estimate, training_estimate

    corpus, harvest = CorpusConfig.from_dict(cfg["corpus"]), HarvestConfig.from_dict(cfg["harvest"])
    sae, tc = SAEConfig.from_dict(cfg["sae"]), TranscoderConfig.from_dict(cfg["transcoder"])
    ctx, tokens = corpus.context_size, corpus.max_tokens
    if harvest.max_contexts:
        tokens = min(tokens, harvest.max_contexts * ctx)
    hooks = selected_hooks(harvest.layers, harvest.hook_points, harvest.hooks)
    out = [harvest_estimate(shape, costs, tokens=tokens, hooks=hooks, ctx=ctx, batch_size=harvest.batch_size,
                            shard_rows=harvest.shard_rows, dtype=harvest.dtype)]
    out.append(training_estimate(costs, stage="train_sae", tokens=sae.training_tokens,
                                 d_in=shape.width_of(sae.hook or "resid_post"), d_sae=sae.d_sae,
                                 buffer_rows=sae.data.buffer_rows, batch_size=sae.data.batch_size,
                                 n_checkpoints=sae.n_checkpoints))
    n_tc = 1 if tc.kind == "clt" else len(tc.layers)
    one = training_estimate(costs, stage="train_transcoder", tokens=tc.training_tokens,
                            d_in=shape.width_of(tc.in_hook), d_out=shape.width_of(tc.out_hook), d_sae=tc.d_sae,
                            buffer_rows=tc.data.buffer_rows, batch_size=tc.data.batch_size)
    out.append(StageEstimate(one.stage, one.seconds * n_tc, one.peak_mb, one.disk_bytes * n_tc,
                             {**one.detail, "jobs": n_tc}))
    return out
