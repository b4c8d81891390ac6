"""Typed config of the benchmark stage (Hydra group ``benchmark``, `config/benchmark/default.yaml`).

`BenchmarkConfig.from_dict` turns the composed mapping into a validated, frozen config; every bad
value raises one `ConfigError` naming the field (``benchmark.acdc.thresholds``, ...) and the fix.
`workflow/schemas/config/benchmark.schema.json` mirrors these fields;
`tests/unit/benchmark/test_config.py` fails on drift.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

from mechflow.errors import ConfigError, check_known_keys
from mechflow.io import canonical_hash

METRICS = ("kl", "task")
COMPONENTS = ("all", "heads")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_keys(where: str, cfg: Mapping[str, Any], cls) -> None:
    check_known_keys(where, cfg, cls)


@dataclass(frozen=True)
class RestrictionConfig:
    """Which edges every method may remove (see `mechflow.benchmark.restriction`).

    Attributes:
        last_layers: only edges whose receiver is in the last ``last_layers`` layers or is the
            logits; None = every layer.
        sender_last_layers: only edges whose sender is a head or MLP of the last
            ``sender_last_layers`` layers (the embedding is excluded); None = every sender.
        components: ``"all"`` or ``"heads"`` (no edge that starts or ends at an MLP).
    """

    last_layers: int | None = None
    sender_last_layers: int | None = None
    components: str = "all"

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> RestrictionConfig:
        cfg = dict(cfg or {})
        _check_keys("benchmark.restriction", cfg, cls)
        out = cls(**cfg)
        if out.last_layers is not None and (not _is_int(out.last_layers) or out.last_layers < 1):
            raise ConfigError(f"benchmark.restriction.last_layers: {out.last_layers!r} must be null "
                              "(every layer) or an integer >= 1")
        if out.sender_last_layers is not None and (not _is_int(out.sender_last_layers)
                                                   or out.sender_last_layers < 1):
            raise ConfigError(f"benchmark.restriction.sender_last_layers: {out.sender_last_layers!r} must be "
                              "null (every sender) or an integer >= 1")
        if out.components not in COMPONENTS:
            raise ConfigError(f"benchmark.restriction.components: {out.components!r} must be one of "
                              f"{list(COMPONENTS)}")
        return out


def check_thresholds(thresholds: Any) -> tuple[float, ...]:
    """Validate an ACDC tau list: non-empty, numbers >= 0, strictly increasing."""
    where = "benchmark.acdc.thresholds"
    if isinstance(thresholds, (str, bytes)) or not hasattr(thresholds, "__iter__"):
        raise ConfigError(f"{where}: {thresholds!r} must be a list of numbers, e.g. [0.001, 0.01, 0.1]")
    taus = list(thresholds)
    if not taus:
        raise ConfigError(f"{where}: the list is empty; give at least one tau >= 0, e.g. [0.01]")
    bad = [t for t in taus if not _is_number(t)]
    if bad:
        raise ConfigError(f"{where}: {bad[0]!r} is not a finite number; every tau must be a number >= 0")
    if any(t < 0 for t in taus):
        raise ConfigError(f"{where}: {min(taus)!r} is negative; tau is a tolerated metric increase, >= 0")
    if any(b <= a for a, b in pairwise(taus)):
        raise ConfigError(f"{where}: {taus!r} must be strictly increasing (sorted, no duplicates)")
    return tuple(float(t) for t in taus)


@dataclass(frozen=True)
class AcdcConfig:
    """ACDC settings (Conmy et al. 2023).

    Attributes:
        thresholds: the tau sweep, strictly increasing; one circuit per tau (ROC points).
        metric: ``"kl"`` (KL(clean || circuit) at the answer position, mean over prompts) or
            ``"task"`` (|mean task metric of the circuit - mean task metric of the model|).
        speculation: most candidate edges evaluated in one batched forward (each copy removes
            one more edge of the current receiver, assuming the earlier ones get removed; the
            decisions are then made sequentially and exactly, see `mechflow.benchmark.acdc`).
            1 = one candidate per forward.
        max_batch_rows: cap on speculation x prompts rows per forward (memory bound).
        prune_dead: as the original ACDC, drop without evaluation every incoming edge of a node
            whose outgoing edges were all removed (its output no longer reaches the logits).
    """

    thresholds: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1)
    metric: str = "kl"
    speculation: int = 1
    max_batch_rows: int = 256
    prune_dead: bool = True

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> AcdcConfig:
        cfg = dict(cfg or {})
        _check_keys("benchmark.acdc", cfg, cls)
        if "thresholds" in cfg:
            cfg["thresholds"] = check_thresholds(cfg["thresholds"])
        out = cls(**cfg)
        out.validate()
        return out

    def validate(self) -> None:
        check_thresholds(self.thresholds)
        check_metric(self.metric)
        for key in ("speculation", "max_batch_rows"):
            v = getattr(self, key)
            if not _is_int(v) or v < 1:
                raise ConfigError(f"benchmark.acdc.{key}: {v!r} must be an integer >= 1")
        if not isinstance(self.prune_dead, bool):
            raise ConfigError(f"benchmark.acdc.prune_dead: {self.prune_dead!r} must be true or false")


def check_metric(metric: Any) -> str:
    if metric not in METRICS:
        raise ConfigError(f"benchmark.acdc.metric: {metric!r} is not one of {list(METRICS)} "
                          "(kl: KL divergence to the clean output; task: distance of the task metric "
                          "from the clean model's value)")
    return metric


@dataclass(frozen=True)
class BenchmarkConfig:
    """Benchmark stage settings.

    Attributes:
        n_prompts: prompt pairs used (the first ones of the largest equal-length bucket).
        restriction: the edge subset every method works on.
        acdc: ACDC settings.
    """

    n_prompts: int = 16
    restriction: RestrictionConfig = field(default_factory=RestrictionConfig)
    acdc: AcdcConfig = field(default_factory=AcdcConfig)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> BenchmarkConfig:
        cfg = dict(cfg or {})
        _check_keys("benchmark", cfg, cls)
        n = cfg.get("n_prompts", cls.n_prompts)
        if not _is_int(n) or n < 1:
            raise ConfigError(f"benchmark.n_prompts: {n!r} must be an integer >= 1 (e.g. 16)")
        return cls(n_prompts=n, restriction=RestrictionConfig.from_dict(cfg.get("restriction")),
                   acdc=AcdcConfig.from_dict(cfg.get("acdc")))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["acdc"]["thresholds"] = list(self.acdc.thresholds)
        return d

    def hash(self) -> str:
        return canonical_hash(self.to_dict())
