"""The ledger of the report: every number it prints, with the file (path + sha256) it was read from.

A number enters the report only through `Ledger.number`, which records the file, the field and the
value as read; the renderers print ``Number.text`` and cite ``Number.evidence``. Every cited file is
hashed once; when `run_manifest.json` recorded the file, the hash must equal the manifest's, else the
report stage refuses (the file changed after the run). Numbers may only come from files the manifest
records (`require_recorded`), so every number of the report is tied to the run that produced it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mechflow.contracts.report import Evidence, Figure, Number
from mechflow.errors import DataError
from mechflow.io import sha256_file


def format_value(value: Any) -> str:
    """How a value is printed: 4 significant digits for floats (scientific below 1e-3), ints as they are."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


class Ledger:
    """Collects `Evidence`, `Number` and `Figure` entries (ids in order of first citation)."""

    def __init__(self, recorded: dict[str, str], manifest_path: Path):
        self.recorded = dict(recorded)
        self.manifest_path = Path(manifest_path)
        self.evidence: dict[str, Evidence] = {}
        self.numbers: dict[str, Number] = {}
        self.figures: dict[str, Figure] = {}

    def cite(self, path: str | Path, *, require_recorded: bool = True) -> str:
        """The evidence id of `path` (hashing it once), after checking it against the run manifest."""
        key = str(path)
        if key in self.evidence:
            return self.evidence[key].id
        if not Path(key).exists():
            raise DataError(f"{key}: cited by the report but missing; re-run the stage that writes it "
                            f"(snakemake {key})")
        digest = sha256_file(key)
        recorded = self.recorded.get(key)
        if recorded is None and require_recorded:
            raise DataError(f"{key}: the report cites it but {self.manifest_path} does not record it; "
                            "re-run the run_manifest rule (snakemake --forcerun run_manifest)")
        if recorded is not None and recorded != digest:
            raise DataError(f"{key} changed after the run: sha256 {digest[:12]}... differs from "
                            f"{recorded[:12]}... recorded in {self.manifest_path}; restore the file or re-run the "
                            "stage that writes it and then run_manifest")
        parts = Path(key).parts
        stage = (parts[2] if len(parts) > 3 else "run") if parts[0] == "results" else Path(key).parent.name
        ev = Evidence(id=f"E{len(self.evidence) + 1}", path=key, sha256=digest, stage=stage,
                      in_manifest=recorded is not None)
        self.evidence[key] = ev
        return ev.id

    def number(self, id: str, label: str, value: Any, path: str | Path, field: str) -> str:
        """Record a number read from `path` at `field`; returns its id (unique; a second entry is an error)."""
        if id in self.numbers:
            raise ValueError(f"number {id} recorded twice")
        if isinstance(value, float) and not math.isfinite(value):
            value = None if math.isnan(value) else value
        self.numbers[id] = Number(id=id, label=label, value=value, text=format_value(value),
                                  evidence=self.cite(path), field=field)
        return id

    def figure(self, id: str, path: str | Path, caption: str) -> str | None:
        """Record a figure (the PNG is hashed too); None when the file does not exist."""
        if not Path(path).exists():
            return None
        self.figures[id] = Figure(id=id, path=str(path), caption=caption,
                                  evidence=self.cite(path, require_recorded=False))
        return id
