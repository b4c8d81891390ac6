"""Snakemake glue, and the only place that knows Snakemake exists.

- `runs`: the run registry (`load_runs`, `RUNS`, wildcard patterns, model pairs, config checks
  that need the whole run).
- `inputs`: every input / params function the rule files use.
- `paths`: the `results/...` folders, spelled once.
- `adapter`: `run_rule(snakemake, stage_function)`, the three-line script adapter.
- `provenance`: the spine stages `resolve_config`, `model_card`, `run_manifest`.

Layering: rule files and scripts import this package; this package imports the stage packages;
no stage package imports this one (`tests/unit/workflow/test_layers.py`).
"""

from mechflow.workflow.adapter import call_with_named, run_rule
from mechflow.workflow.runs import (
    PAIR_SEPARATOR,
    RUN_PATTERN,
    RUNS,
    TASK_PATTERN,
    check_dictionary_widths,
    check_harvested_hooks,
    load_runs,
    model_pairs,
    tasks_of_setting,
)

__all__ = ["PAIR_SEPARATOR", "RUN_PATTERN", "RUNS", "TASK_PATTERN", "call_with_named", "check_dictionary_widths",
           "check_harvested_hooks", "load_runs", "model_pairs", "run_rule", "tasks_of_setting"]
