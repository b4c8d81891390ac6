"""Typed config of the reference stage (Hydra group ``reference``, `config/reference/default.yaml`).

Two parts, so that the expensive exact reference is recomputed only when ITS settings change:

* the exact part (`EXACT_KEYS`, read by rule ``edge_reference``): prompts, restriction, sample,
  seed, batch size;
* the method part (read only by rule ``reference``): EAP-IG settings and the positives definition.

`workflow/schemas/config/reference.schema.json` mirrors these fields;
``tests/unit/reference/test_reference_config.py`` fails on drift.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from mechflow.benchmark.config import (
    RestrictionConfig,
    _check_keys,
    _is_int,
    _is_number,
)
from mechflow.errors import ConfigError
from mechflow.io import canonical_hash

EXACT_KEYS = ("n_prompts", "restriction", "n_sampled_edges", "min_per_layer", "seed", "max_batch_rows")
IG_RULES = ("left", "midpoint")


@dataclass(frozen=True)
class PositivesConfig:
    """Which components / edges count as "in the reference circuit" for ROC AUC.

    Both variants are always reported (`mechflow.reference.auc.positives`):

    Attributes:
        top_fraction: top-k variant, k = ceil(top_fraction x n) items by |exact effect|.
        threshold: threshold variant, |exact effect| > threshold x |m(N) - m(empty)| (the
            clean-corrupted gap of the task metric).
    """

    top_fraction: float = 0.1
    threshold: float = 0.01


@dataclass(frozen=True)
class ReferenceConfig:
    """Reference stage settings.

    Attributes:
        n_prompts: prompt pairs of the edge reference (first of the largest equal-length bucket).
        restriction: the restricted graph whose every edge is removed alone (same keys as
            ``benchmark.restriction``).
        n_sampled_edges: edges of the FULL graph sampled, stratified by receiver layer.
        min_per_layer: least sampled edges per receiver layer (the logits are one more layer).
        seed: sampling seed.
        max_batch_rows: edge copies x prompts per batched forward of the exact evaluation.
        ig_steps, ig_rule: EAP-IG settings when its scores are computed here (the circuit stage's
            scores are reused when prompts and these settings match).
        positives: the positives definition for ROC AUC.
        tasks: the tasks that get a reference (read by the rules; each must be one of the run's
            tasks); None (default) = every task of the run.
    """

    n_prompts: int = 8
    restriction: RestrictionConfig = field(default_factory=lambda: RestrictionConfig(4, 4, "all"))
    n_sampled_edges: int = 2000
    min_per_layer: int = 20
    seed: int = 0
    max_batch_rows: int = 256
    ig_steps: int = 5
    ig_rule: str = "left"
    positives: PositivesConfig = field(default_factory=PositivesConfig)
    tasks: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> ReferenceConfig:
        cfg = dict(cfg or {})
        _check_keys("reference", cfg, cls)
        try:
            restriction = RestrictionConfig.from_dict(cfg.pop("restriction", asdict(cls().restriction)))
        except ConfigError as e:
            raise ConfigError(str(e).replace("benchmark.restriction", "reference.restriction")) from None
        pos = dict(cfg.pop("positives", None) or {})
        _check_keys("reference.positives", pos, PositivesConfig)
        positives = PositivesConfig(**pos)
        tasks = cfg.pop("tasks", None)
        if tasks is not None and (not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) for t in tasks)):
            raise ConfigError(f"reference.tasks: {tasks!r} must be null (every task) or a list of task names, e.g. [ioi]")
        out = cls(restriction=restriction, positives=positives, tasks=None if tasks is None else tuple(tasks), **cfg)
        out.validate()
        return out

    def validate(self) -> None:
        for key, low in (("n_prompts", 1), ("n_sampled_edges", 0), ("min_per_layer", 0), ("seed", 0),
                         ("max_batch_rows", 1), ("ig_steps", 1)):
            v = getattr(self, key)
            if not _is_int(v) or v < low:
                raise ConfigError(f"reference.{key}: {v!r} must be an integer >= {low}")
        if self.ig_rule not in IG_RULES:
            raise ConfigError(f"reference.ig_rule: {self.ig_rule!r} must be one of {list(IG_RULES)}")
        f, t = self.positives.top_fraction, self.positives.threshold
        if not _is_number(f) or not 0 < f < 1:
            raise ConfigError(f"reference.positives.top_fraction: {f!r} must be a number in (0, 1), e.g. 0.1")
        if not _is_number(t) or t <= 0:
            raise ConfigError(f"reference.positives.threshold: {t!r} must be a number > 0 (fraction of "
                              "|m(N) - m(empty)|), e.g. 0.01")

    def to_dict(self) -> dict:
        return asdict(self)

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
