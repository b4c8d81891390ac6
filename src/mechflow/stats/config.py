"""Typed configuration of the statistics stage (`config/stats/default.yaml`).

`StatsConfig.from_dict` turns a (Hydra-composed) mapping into a validated, frozen config; a bad
value raises one `ConfigError` naming the field (`stats.<field>`) and the fix.
`workflow/schemas/config/stats.schema.json` is generated from this class.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import Field, StrictFloat, StrictInt

from mechflow.config import GroupConfig, UniqueItems, config_model, is_int, is_number
from mechflow.errors import ConfigError

CiMethod = Literal["percentile", "bca"]
FcasNull = Literal["shuffle_depth", "random_sets"]
FeatureNull = Literal["shuffle", "circular_shift"]
CI_METHODS: tuple[str, ...] = get_args(CiMethod)
FCAS_NULLS: tuple[str, ...] = get_args(FcasNull)
FEATURE_NULLS: tuple[str, ...] = get_args(FeatureNull)


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
    feature_null: FeatureNull = Field("shuffle", description="Null for cross-model feature matching: permute or "
                                      "circularly shift the shared token axis of one model.")
    feature_n_permutations: StrictInt = Field(100, ge=1,
                                              description="Number of null draws for cross-model feature matching.")




def check_positive_int(name: str, value: Any) -> int:
    """Return `value` if it is an int >= 1, else raise `ConfigError` naming `name`.

    For the statistics functions called with plain arguments; a `StatsConfig` is already checked.
    """
    if not is_int(value) or value < 1:
        raise ConfigError(f"{name}: {value!r} must be an integer >= 1")
    return value


def check_ci_level(name: str, value: Any) -> float:
    """Return `value` if it is a number strictly inside (0, 1), else raise `ConfigError`."""
    if not is_number(value) or not 0.0 < value < 1.0:
        raise ConfigError(f"{name}: {value!r} must be a number strictly between 0 and 1 (e.g. 0.95)")
    return float(value)
