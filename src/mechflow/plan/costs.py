"""Read the measured per-token costs (`MeasuredCosts`) that every estimate extrapolates from."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from mechflow.contracts.documents import read_document
from mechflow.contracts.plan import MeasuredCosts

SHIPPED = Path(__file__).parent / "data" / "measured_costs.json"


@functools.lru_cache(maxsize=4)
def _read(path: str) -> MeasuredCosts:
    return read_document(path, MeasuredCosts, fix="measure this machine's costs with `python benchmarks/costs.py "
                         "--out FILE` (make bench) and pass --costs FILE, or drop --costs to use the shipped file")


def load_costs(path: str | os.PathLike | None = None) -> MeasuredCosts:
    """The costs in `path`, else ``$MECHFLOW_COSTS``, else the file measured on the reference machine
    (2 cores, 1 torch thread per job) that ships with the package."""
    chosen = path or os.environ.get("MECHFLOW_COSTS") or SHIPPED
    return _read(str(Path(chosen).resolve()))
