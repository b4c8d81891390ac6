"""Typed configuration of the statistics stage (`config/stats/default.yaml`).

`StatsConfig.from_dict` is the single entry point that turns a (Hydra-composed) mapping into a
validated, frozen config; every bad value raises one `ConfigError` naming the field
(`stats.<field>`) and the fix. The JSON schema `workflow/schemas/config/stats.schema.json`
mirrors these fields; `tests/unit/stats/test_config.py` fails on drift.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from mechflow.errors import ConfigError

CI_METHODS = ("percentile", "bca")
FCAS_NULLS = ("shuffle_depth", "random_sets")
FEATURE_NULLS = ("shuffle", "circular_shift")


@dataclass(frozen=True)
class StatsConfig:
    """Statistics stage settings. See the schema for each field's meaning."""

    B: int = 1000
    ci_level: float = 0.95
    ci_methods: tuple[str, ...] = CI_METHODS
    seed: int = 0
    top_k: int = 20
    n_permutations: int = 1000
    fcas_null: str = "shuffle_depth"
    quantiles: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)
    feature_null: str = "shuffle"
    feature_n_permutations: int = 100

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> "StatsConfig":
        """Validate `cfg` (missing keys take defaults; unknown keys are an error)."""
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(
                f"stats.{unknown[0]}: unknown key; valid keys are {sorted(known)} "
                "(check for a typo in config/stats/*.yaml or the override)"
            )
        for key in ("ci_methods", "quantiles"):
            if key in cfg and not isinstance(cfg[key], str):
                try:
                    cfg[key] = tuple(cfg[key])
                except TypeError:
                    raise ConfigError(f"stats.{key}: expected a list, got {cfg[key]!r}") from None
        out = cls(**cfg)
        out.validate()
        return out

    def validate(self) -> None:
        """Raise `ConfigError` naming the first invalid field."""
        check_positive_int("stats.B", self.B)
        check_ci_level("stats.ci_level", self.ci_level)
        if isinstance(self.ci_methods, str) or not self.ci_methods or any(
            m not in CI_METHODS for m in self.ci_methods
        ):
            raise ConfigError(
                f"stats.ci_methods: {self.ci_methods!r} must be a non-empty list drawn from {list(CI_METHODS)}"
            )
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"stats.seed: {self.seed!r} must be a non-negative integer")
        check_positive_int("stats.top_k", self.top_k)
        check_positive_int("stats.n_permutations", self.n_permutations)
        if self.fcas_null not in FCAS_NULLS:
            raise ConfigError(f"stats.fcas_null: {self.fcas_null!r} must be one of {list(FCAS_NULLS)}")
        if isinstance(self.quantiles, str) or not self.quantiles or any(
            not _is_number(q) or not 0.0 <= q <= 1.0 for q in self.quantiles
        ):
            raise ConfigError(f"stats.quantiles: {self.quantiles!r} must be a non-empty list of numbers in [0, 1]")
        if self.feature_null not in FEATURE_NULLS:
            raise ConfigError(
                f"stats.feature_null: {self.feature_null!r} must be one of {list(FEATURE_NULLS)}"
            )
        check_positive_int("stats.feature_n_permutations", self.feature_n_permutations)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_positive_int(name: str, value: Any) -> int:
    """Return `value` if it is an int >= 1, else raise `ConfigError` naming `name`."""
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{name}: {value!r} must be an integer >= 1")
    return value


def check_ci_level(name: str, value: Any) -> float:
    """Return `value` if it is a number strictly inside (0, 1), else raise `ConfigError`."""
    if not _is_number(value) or not 0.0 < value < 1.0:
        raise ConfigError(f"{name}: {value!r} must be a number strictly between 0 and 1 (e.g. 0.95)")
    return float(value)
