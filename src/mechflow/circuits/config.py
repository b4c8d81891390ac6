"""Typed config of the circuits stage (Hydra group ``circuits``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from mechflow.errors import ConfigError
from mechflow.io import canonical_hash

UNITS = ("edges", "nodes", "auto")


@dataclass(frozen=True)
class CircuitConfig:
    """Circuit discovery settings.

    Attributes:
        unit: what the circuit is made of: ``"edges"`` (MIB edge graph), ``"nodes"`` (input, heads,
            MLPs; `mechflow.circuits.nodes`) or ``"auto"`` (default): edges where the model supports
            edge patching (`check_edge_model` and ``model.edge_circuits``), else nodes (Gemma-3).
        method: ranking, ``"eap-ig"`` (default) or ``"eap"`` (edge scores, or the same estimator
            on node activations for node circuits).
        ig_steps: EAP-IG interpolation points (MIB uses 5).
        ig_rule: ``"left"`` (points of the reference EAP-IG code, t = k/steps) or ``"midpoint"``.
        target: normalised faithfulness the minimal circuit must reach, in (0, 1].
        absolute: rank edges by |score| (MIB default) instead of signed score.
        percentages: budgets (percent of all edges, or nodes) of the faithfulness curve / CPR / CMD.
    """

    unit: str = "auto"
    method: str = "eap-ig"
    ig_steps: int = 5
    ig_rule: str = "left"
    target: float = 0.8
    absolute: bool = True
    percentages: tuple[float, ...] = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ConfigError(f"circuit.unit: {self.unit!r} is not one of {', '.join(map(repr, UNITS))}.")
        if self.method not in ("eap", "eap-ig"):
            raise ConfigError(f"circuit.method: {self.method!r} is not one of 'eap', 'eap-ig'.")
        if not isinstance(self.ig_steps, int) or self.ig_steps < 1:
            raise ConfigError(f"circuit.ig_steps: {self.ig_steps!r} must be an integer >= 1 (MIB uses 5).")
        if self.ig_rule not in ("left", "midpoint"):
            raise ConfigError(f"circuit.ig_rule: {self.ig_rule!r} is not one of 'left', 'midpoint'.")
        if isinstance(self.target, bool) or not isinstance(self.target, (int, float)) or not 0 < self.target <= 1:
            raise ConfigError(f"circuit.target: {self.target!r} must lie in (0, 1], e.g. 0.8.")
        pct = tuple(float(p) for p in self.percentages)
        if not pct or any(not 0 < p <= 100 for p in pct) or list(pct) != sorted(set(pct)):
            raise ConfigError(f"circuit.percentages: {self.percentages!r} must be strictly increasing "
                              "values in (0, 100].")
        object.__setattr__(self, "percentages", pct)

    @classmethod
    def from_dict(cls, cfg: dict) -> CircuitConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"circuit.{unknown[0]}: unknown key; known keys are {sorted(known)}.")
        return cls(**{k: (tuple(v) if k == "percentages" else v) for k, v in cfg.items()})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["percentages"] = list(self.percentages)
        return d

    def hash(self) -> str:
        return canonical_hash(self.to_dict())
