"""The run registry: every sweep point of `--config overrides=...`, composed once per Snakemake process.

The Snakefile calls `load_runs(config)`; input/params functions (`mechflow.workflow.inputs`) read
`RUNS[wildcards.run]`. Library modules never import this package (a test enforces it).
"""

from __future__ import annotations

from mechflow.config import Run, compose_runs
from mechflow.errors import ConfigError

RUNS: dict[str, Run] = {}
RUN_PATTERN = r"[A-Za-z0-9_.=+-]+"
TASK_PATTERN = r"[A-Za-z0-9_]+"
PAIR_SEPARATOR = "__vs__"


def load_runs(snakemake_config: dict) -> dict[str, Run]:
    """Compose every run of `--config overrides=...` and remember them for the input functions."""
    runs = compose_runs(snakemake_config.get("overrides"))
    RUNS.clear()
    RUNS.update(runs)
    return runs


def tasks_of_setting(run: str, key: str, wanted) -> list[str]:
    """The tasks a stage setting selects (``wanted``; None = every task of the run), in their given
    order, each checked against the run's selected tasks (ConfigError naming ``key`` otherwise)."""
    selected = RUNS[run].cfg["task"]
    if wanted is None:
        return sorted(selected)
    wanted = list(wanted)
    missing = sorted(set(wanted) - set(selected))
    if missing:
        raise ConfigError(f"{key}: {missing} are not selected in `task` of run {run!r}; add them, e.g. "
                          f"task=[{','.join(sorted(set(selected) | set(missing)))}], or remove them from {key}")
    return wanted



def model_pairs(runs: dict[str, Run]) -> dict[str, tuple[str, str]]:
    """Pairs of runs that differ only in the model (same other overrides): cross-model comparisons."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, run in runs.items():
        key = tuple(o for o in run.overrides if not o.split("=", 1)[0].lstrip("+~") == "model")
        groups.setdefault(key, []).append(name)
    pairs = {}
    for names in groups.values():
        names = sorted(names, key=lambda n: runs[n].cfg["model"]["name"])
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if runs[a].cfg["model"]["name"] != runs[b].cfg["model"]["name"]:
                    pairs[f"{a}{PAIR_SEPARATOR}{b}"] = (a, b)
    return pairs


def pair_runs(pair: str) -> tuple[str, str]:
    """The two run names of a cross-model `pair` wildcard."""
    return model_pairs(RUNS)[pair]


def transcoder_hooks(run: str) -> list[tuple[str, str]]:
    """(MLP-in, MLP-out) hook of every transcoder layer of the run (class defaults filled in)."""
    from mechflow.dictionaries.config import TranscoderConfig, parse_config

    cfg = parse_config(TranscoderConfig, RUNS[run].cfg["transcoder"], "transcoder")
    return [(cfg.in_hook.format(layer=layer), cfg.out_hook.format(layer=layer)) for layer in cfg.layers]


def check_dictionary_widths(run: Run) -> None:
    """Fail when the composed config is composed, not when training starts: an SAE whose `d_in` cannot
    match the width of its hook in this model (`model.d_model` / `model.d_mlp`, stated in the model's
    config group and checked when the model loads)."""
    from mechflow.contracts.hooks import hook_width

    sae, model = run.cfg.get("sae"), run.cfg.get("model", {})
    if not sae or sae.get("d_in") is None or not sae.get("hook"):
        return
    width = hook_width(sae["hook"], model.get("d_model"), model.get("d_mlp"))
    if width is not None and width != sae["d_in"]:
        raise ConfigError(f"sae.d_in: {sae['d_in']} cannot match {sae['hook']} of {model.get('name')} in run "
                          f"{run.name!r}, whose width is {width}; set sae.d_in={width} or null (the harvest's width)")


def check_harvested_hooks(run: Run) -> None:
    """Fail early when a dictionary trains on a hook the harvest does not produce."""
    from mechflow.harvest.hooks import harvested_hooks

    harvested = harvested_hooks(run.cfg["harvest"])
    needed = []
    if "sae" in run.cfg:
        needed.append(("sae.hook", run.cfg["sae"]["hook"]))
    if "transcoder" in run.cfg:
        needed += [("transcoder.in_hook/out_hook", h) for pair in transcoder_hooks(run.name) for h in pair]
    for field_name, hook in needed:
        if hook not in harvested:
            raise ConfigError(
                f"{field_name}: {hook!r} is not harvested in run {run.name!r} (harvested: {sorted(harvested)}). "
                f"Add it with an override, e.g. harvest.hooks=[{hook}], or change {field_name}.")
