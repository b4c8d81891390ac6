"""Typed configuration of the statistics stage (`config/stats/default.yaml`).

`StatsConfig.from_dict` turns a (Hydra-composed) mapping into a validated, frozen config; a bad
value raises one `ConfigError` naming the field (`stats.<field>`) and the fix.
`workflow/schemas/config/stats.schema.json` is generated from this class.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field, StrictFloat, StrictInt

from mechflow.config import GroupConfig, UniqueItems, config_model

CiMethod = Literal["percentile", "bca"]
FcasNull = Literal["shuffle_depth", "random_sets"]
CI_METHODS: tuple[str, ...] = get_args(CiMethod)
FCAS_NULLS: tuple[str, ...] = get_args(FcasNull)


@config_model("stats")
class StatsConfig(GroupConfig):
    """Statistics stage config (config/stats/*.yaml)."""

    B: StrictInt = Field(1000, ge=1, description="Number of bootstrap resamples of prompts (with replacement).")
    ci_level: StrictFloat = Field(0.95, gt=0, lt=1,
                                  description="Two-sided nominal coverage of the confidence intervals.")
    ci_methods: Annotated[tuple[CiMethod, ...], UniqueItems] = Field(
        CI_METHODS, min_length=1,
        description="Bootstrap interval methods: percentile and/or BCa (Efron & Tibshirani 1993).")
    seed: StrictInt = Field(0, ge=0,
                            description="Seed of the numpy Generator used for resampling and permutation nulls.")
    top_k: StrictInt = Field(20, ge=1, description="Number of top components (by |attribution|) for top-k overlap "
                             "and FCAS; must not exceed the number of components.")
    n_permutations: StrictInt = Field(1000, ge=1, description="Number of FCAS permutation-null draws; the smallest "
                                      "reachable p-value is 1/(1+n_permutations).")
    fcas_null: FcasNull = Field("shuffle_depth", description="FCAS null: shuffle the component-to-depth assignment "
                                "within each model, or draw random component sets of size top_k.")
    quantiles: tuple[Annotated[StrictFloat, Field(ge=0, le=1)], ...] = Field(
        (0.05, 0.25, 0.5, 0.75, 0.95), min_length=1,
        description="Quantile levels reported for the Kendall tau and Jaccard distributions.")
