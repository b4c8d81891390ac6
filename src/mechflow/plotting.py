"""One figure style and one way to save a figure, for the report's paper figures (`snakemake figures`).

`style()` is a matplotlib rc context (sizes for a 15 cm column, no top/right spines, light grid,
colour-blind-safe cycle); `save_figure` writes a figure atomically in the format its suffix names,
with no creation date in the metadata, so a figure regenerated from the same data has the same bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from mechflow.io import atomic_path

# Okabe-Ito, the colour-blind-safe palette
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
STYLE = {
    "font.size": 8.5, "axes.titlesize": 9, "axes.labelsize": 8.5, "xtick.labelsize": 8, "ytick.labelsize": 8,
    "legend.fontsize": 7.5, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.alpha": 0.3, "grid.linewidth": 0.5, "lines.linewidth": 1.2, "lines.markersize": 4,
    "figure.dpi": 100, "savefig.dpi": 200, "savefig.bbox": "tight", "pdf.fonttype": 42,
}


@contextlib.contextmanager
def style() -> Iterator[None]:
    import matplotlib
    from cycler import cycler

    matplotlib.use("Agg")
    with matplotlib.rc_context({**STYLE, "axes.prop_cycle": cycler(color=PALETTE)}):
        yield


def save_figure(fig, path: str | Path, *, dpi: float | None = None, bbox_inches: str | None = None) -> Path:
    """Write `fig` to `path` (format from the suffix: .png, .pdf, .svg; default png) atomically and
    reproducibly (no software version or date in the file). `dpi` / `bbox_inches`: matplotlib's
    (None: the rc values, which `style()` sets for the paper figures). Every figure of mechflow is
    saved here."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    metadata = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Creator": None, "Producer": None},
                "svg": {"Date": None, "Creator": None}}.get(fmt)
    kwargs = {k: v for k, v in (("dpi", dpi), ("bbox_inches", bbox_inches)) if v is not None}
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, metadata=metadata, **kwargs)
    return path
