"""Per-rule cluster resources (``mem_mb``, ``runtime`` in minutes, ``gpu``) derived from each run's config.

Rules call these in ``resources:``; Snakemake evaluates them per job with its ``attempt`` (a job the
cluster killed comes back with twice the memory and time: the SLURM profile retries once).

* Token-scaled rules (``harvest``, ``harvest_layers``, ``train_sae``, ``train_transcoder``,
  ``train_layer_transcoder``): `mechflow.plan` estimates from the measured per-token costs and the
  run's model shape, corpus tokens, hooks, dictionary widths and batch sizes; the request is
  `mechflow.plan.estimate.mem_mb` / `runtime_min` of the estimate (1.5 × memory + 1 GB, 2 × time + 10 min).
* Model-loading rules (attribution, circuits, graphs, features, …): the rule states its request for
  SmolLM2-135M (sized from measured runs, docs/performance.md); for another model it is scaled by
  the ratio of forward FLOPs per token (time) and of weights (memory), and by the task's prompt count
  relative to the reference's 64 for per-task rules.
* A model mechflow cannot size (a hub name without a preset and without a local ``config.json``) gets
  the stated SmolLM2 values: set ``set-resources`` in the profile for it (README, "Cluster resources").

``gpu`` is 1 for a dictionary rule whose config sets ``device: cuda…`` (SAELens trains there), else 0;
mechflow's other stages run on CPU.
"""

from __future__ import annotations

from typing import Any, Callable

from mechflow.workflow.inputs import job_run
from mechflow.workflow.runs import RUNS

REFERENCE_PROMPTS = 64  # the default tasks' n_prompts: per-task requests are stated for this many


def _shape(run: str):
    from mechflow.plan.shapes import shape_for_model_cfg

    return shape_for_model_cfg(RUNS[run].cfg["model"])


def _estimate(rule: str, wildcards) -> Any:
    """The plan's estimate of one job of a token-scaled rule (None: the model's shape is unknown)."""
    from mechflow.plan import harvest_estimate, load_costs, training_estimate
    from mechflow.plan.run import run_estimates

    run = wildcards.run
    shape, cfg = _shape(run), RUNS[run].cfg
    if shape is None:
        return None
    costs = load_costs()
    if rule == "harvest":
        return run_estimates(cfg, shape, costs)[0]
    if rule == "train_sae":
        return run_estimates(cfg, shape, costs)[1]
    if rule == "train_transcoder":
        return run_estimates(cfg, shape, costs)[2]
    from mechflow.corpus.config import CorpusConfig
    from mechflow.dictionaries.config import TranscoderSetConfig
    from mechflow.harvest.config import HarvestConfig

    tset = TranscoderSetConfig.from_dict(cfg["transcoder_set"])
    if rule == "harvest_layers":
        from mechflow.dictionaries.transcoder_set import harvest_groups, layer_hooks

        corpus, harvest = CorpusConfig.from_dict(cfg["corpus"]), HarvestConfig.from_dict(cfg["harvest"])
        layers = harvest_groups(tset, cfg["model"])[int(wildcards.group)]
        tokens = corpus.max_tokens
        if tset.harvest_max_contexts:
            tokens = min(tokens, tset.harvest_max_contexts * corpus.context_size)
        hooks = [h for layer in layers for h in layer_hooks(tset, layer)]
        return harvest_estimate(shape, costs, tokens=tokens, hooks=hooks, ctx=corpus.context_size,
                                batch_size=harvest.batch_size, shard_rows=harvest.shard_rows, dtype=harvest.dtype)
    if rule == "train_layer_transcoder":
        return training_estimate(costs, stage=rule, tokens=tset.training_tokens, d_in=shape.width_of(tset.in_hook),
                                 d_out=shape.width_of(tset.out_hook), d_sae=tset.d_sae,
                                 buffer_rows=tset.data.buffer_rows, batch_size=tset.data.batch_size)
    raise KeyError(rule)


def _scaled(rule: str, wildcards, mem_mb: int, runtime: int):
    """A model-loading rule's (mem_mb, runtime) for the run's model, from its SmolLM2 values."""
    from mechflow.plan.estimate import model_stage_estimate
    from mechflow.plan.shapes import preset

    run = job_run(wildcards)
    shape = _shape(run)
    if shape is None:
        return mem_mb, runtime
    task = getattr(wildcards, "task", None)
    prompts = RUNS[run].cfg["task"].get(task, {}).get("n_prompts") if task else None
    work = prompts / REFERENCE_PROMPTS if prompts else 1.0
    est = model_stage_estimate(shape, preset("smollm2_135m"), stage=rule, ref_seconds=runtime * 60, ref_mb=mem_mb,
                               work_ratio=work)
    return max(round(est.peak_mb), 1000), max(round(est.seconds / 60), 15)


def mem_mb_of(rule: str, smollm2_mb: int | None = None) -> Callable[..., int]:
    """`resources: mem_mb=` of `rule`: from the plan (token-scaled rules) or scaled from `smollm2_mb`."""

    def mem_mb(wildcards, attempt: int = 1) -> int:
        from mechflow.plan.estimate import mem_mb as request

        if smollm2_mb is not None:
            return _scaled(rule, wildcards, smollm2_mb, 60)[0] * 2 ** (attempt - 1)
        est = _estimate(rule, wildcards)
        return request(est, attempt) if est is not None else 8000 * 2 ** (attempt - 1)

    mem_mb.__name__ = f"mem_mb_{rule}"
    return mem_mb


def runtime_of(rule: str, smollm2_min: int | None = None) -> Callable[..., int]:
    """`resources: runtime=` (minutes) of `rule`, as `mem_mb_of`."""

    def runtime(wildcards, attempt: int = 1) -> int:
        from mechflow.plan.estimate import runtime_min

        if smollm2_min is not None:
            return _scaled(rule, wildcards, 4000, smollm2_min)[1] * 2 ** (attempt - 1)
        est = _estimate(rule, wildcards)
        return runtime_min(est, attempt) if est is not None else 120 * 2 ** (attempt - 1)

    runtime.__name__ = f"runtime_{rule}"
    return runtime


def gpu_of(group: str) -> Callable[..., int]:
    """`resources: gpu=`: 1 when the `group` config trains on a CUDA device, else 0."""

    def gpu(wildcards) -> int:
        from mechflow.dictionaries.config import SAEConfig, TranscoderConfig, TranscoderSetConfig

        typed = {"sae": SAEConfig, "transcoder": TranscoderConfig, "transcoder_set": TranscoderSetConfig}[group]
        return int(typed.from_dict(RUNS[job_run(wildcards)].cfg[group]).device.startswith("cuda"))

    gpu.__name__ = f"gpu_{group}"
    return gpu
