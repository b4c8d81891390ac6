"""Attribution files: ``agreement.json`` (the Parquet tables are in `mechflow.contracts.parquet`)."""

from __future__ import annotations

from pydantic import Field

from mechflow.contracts.documents import Document


class MethodAgreement(Document):
    """One approximate method's per-component mean scores against exact patching's."""

    pearson_vs_exact: float
    spearman_vs_exact: float
    max_abs_error: float


class Agreement(Document):
    """``agreement.json`` of the ``attribute`` rule (one key per approximate method that ran)."""

    ap: MethodAgreement | None = Field(None, description="attribution patching vs exact")
    ig: MethodAgreement | None = Field(None, description="integrated-gradients patching vs exact")
    n_prompts: int
    ig_steps: int
    direction: str = Field(description="noising: clean run, one component takes its corrupted value")
    m_clean_mean: float
    m_corrupted_mean: float
    dla_sum_minus_logit_diff_max: float = Field(description="largest |sum of DLA terms - logit difference|")
