"""Typed config of the summary stage (Hydra group ``summary``, `config/summary/default.yaml`).

`workflow/schemas/config/summary.schema.json` is generated from `SummaryConfig`.
"""

from __future__ import annotations

from pydantic import Field, StrictInt

from mechflow.config import GroupConfig, config_model


@config_model("summary")
class SummaryConfig(GroupConfig):
    """The end-of-run summary: a table of task baselines and harvest statistics, and one figure."""

    figure_dpi: StrictInt = Field(120, ge=30, le=600, description="resolution of the summary figure")
    norm_sample_rows: StrictInt = Field(20000, ge=1, description="activation rows read (lazily) per hook for the "
                                        "norm histogram")
