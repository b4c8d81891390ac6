"""wandb logging for stages, offline by default and never asking for a key.

Mode comes from, in order: the WANDB_MODE environment variable, then `wandb_cfg["mode"]`,
then "offline". Offline runs land in `<run_dir>/wandb/` and can be synced later with
`wandb sync`. Tests set WANDB_MODE=disabled (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)


class _NullRun:
    """Stands in for a wandb run when logging is disabled, so stages call `.log` unconditionally."""

    def log(self, *_: Any, **__: Any) -> None:
        pass

    def finish(self) -> None:
        pass


@contextlib.contextmanager
def stage_run(stage: str, config: dict | None, run_dir: str | os.PathLike | None,
              wandb_cfg: dict | None = None, name: str | None = None) -> Iterator[Any]:
    """Yield a wandb run (or a no-op stand-in) for one stage job."""
    wandb_cfg = wandb_cfg or {}
    mode = os.environ.get("WANDB_MODE") or wandb_cfg.get("mode") or "offline"
    if mode == "disabled":
        yield _NullRun()
        return
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    wandb_dir = Path(run_dir) if run_dir is not None else Path("results")
    wandb_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=wandb_cfg.get("project", "mechflow"),
        job_type=stage,
        group=name,
        name=f"{name}:{stage}" if name else stage,
        config=config or {},
        dir=str(wandb_dir),
        mode=mode,
        reinit="finish_previous",
    )
    try:
        yield run
    finally:
        run.finish()
