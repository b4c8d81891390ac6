"""Typed config of the reference stage (Hydra group ``reference``, `config/reference/default.yaml`).

Two parts, so that the expensive exact reference is recomputed only when ITS settings change:

* the exact part (`EXACT_KEYS`, read by rule ``edge_reference``): prompts, restriction, sample,
  seed, batch size;
* the method part (read only by rule ``reference``): EAP-IG settings and the positives definition.

`workflow/schemas/config/reference.schema.json` is generated from `ReferenceConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field, StrictFloat, StrictInt, StrictStr

from mechflow.benchmark.config import RestrictionConfig
from mechflow.circuits.config import IgRule, IgSteps
from mechflow.config import GroupConfig, config_model
from mechflow.io import canonical_hash

EXACT_KEYS = ("n_prompts", "restriction", "n_sampled_edges", "min_per_layer", "seed", "max_batch_rows")


@config_model("reference.positives")
class PositivesConfig(GroupConfig):
    """Which components / edges count as "in the reference circuit" for ROC AUC; both variants are
    always reported (`mechflow.reference.auc.positives`)."""

    top_fraction: StrictFloat = Field(0.1, gt=0, lt=1, description="Top-k variant: k = ceil(top_fraction x items) "
                                      "by |exact effect|.")
    threshold: StrictFloat = Field(0.01, gt=0, description="Threshold variant: |exact effect| > threshold x "
                                   "|m(N) - m(empty)| (the clean-corrupted gap of the task metric).")


@config_model("reference")
class ReferenceConfig(GroupConfig):
    """Reference stage config (config/reference/*.yaml): exact-patching reference and ROC AUC of every
    attribution method."""

    n_prompts: StrictInt = Field(8, ge=1, description="Prompt pairs of the edge reference: the first of the task's "
                                 "largest equal-length bucket.")
    restriction: RestrictionConfig = Field(
        RestrictionConfig(last_layers=4, sender_last_layers=4),
        description="Restricted graph whose every edge is removed alone (same keys as benchmark.restriction).")
    n_sampled_edges: StrictInt = Field(2000, ge=0, description="Edges of the FULL graph sampled, stratified by "
                                       "receiver layer (the logits are one more layer).")
    min_per_layer: StrictInt = Field(20, ge=0, description="Least sampled edges per receiver layer; the rest "
                                     "proportional to layer size.")
    seed: StrictInt = Field(0, ge=0, description="Sampling seed.")
    max_batch_rows: StrictInt = Field(256, ge=1, description="Edge copies x prompts per batched exact forward "
                                      "(memory bound; values unchanged).")
    ig_steps: IgSteps = Field(5, description="EAP-IG interpolation points when its scores are computed here "
                                "(the circuit stage's scores are reused when prompts and these settings match).")
    ig_rule: IgRule = Field("left", description="EAP-IG interpolation rule.")
    positives: PositivesConfig = Field(PositivesConfig(),
                                       description="Reference positives for ROC AUC; both variants are reported.")
    tasks: tuple[StrictStr, ...] | None = Field(None, description="Tasks that get a reference (each must be one of "
                                                "the run's selected tasks); null = every task.")

    def exact_dict(self) -> dict:
        """The settings the exact edge reference depends on."""
        d = self.to_dict()
        return {k: d[k] for k in EXACT_KEYS}

    def exact_hash(self) -> str:
        """Hash of the exact part without the batch size (it changes no value)."""
        return canonical_hash({k: v for k, v in self.exact_dict().items() if k != "max_batch_rows"})

    def hash(self) -> str:
        return canonical_hash(self.to_dict())


def exact_settings(cfg: Mapping[str, Any]) -> dict:
    """The exact part of a raw ``reference`` group (rule ``edge_reference``'s params)."""
    return {k: v for k, v in dict(cfg).items() if k in EXACT_KEYS}
