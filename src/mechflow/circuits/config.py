"""Typed config of the circuits stage (Hydra group ``circuits``, `config/circuits/default.yaml`).

`workflow/schemas/config/circuits.schema.json` is generated from `CircuitConfig`.

Each constraint of a circuits setting is stated once, here: `Target` (also used by other groups'
models that hold a faithfulness target), `IgSteps`, `IgRule`, `Method`, `Unit`, `Percent`. Library functions called
with raw values (`minimal_faithful_prefix`, `edge_scores`, `resolve_unit`) check them with
`checked`, which runs this model's own validation, so there is no second implementation.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, Field, StrictBool, StrictFloat, StrictInt

from mechflow.config import GroupConfig, config_model
from mechflow.io import canonical_hash

Unit = Literal["edges", "nodes", "auto"]
UNITS: tuple[str, ...] = get_args(Unit)
Method = Literal["eap-ig", "eap"]
METHODS: tuple[str, ...] = get_args(Method)
Percent = Annotated[StrictFloat, Field(gt=0, le=100)]
Target = Annotated[StrictFloat, Field(gt=0, le=1)]
IgSteps = Annotated[StrictInt, Field(ge=1)]
"""EAP-IG interpolation points (circuits, benchmark, reference): an integer >= 1."""
IgRule = Literal["left", "midpoint"]
"""EAP-IG interpolation rule: left (t = k/steps, as the reference EAP-IG code) or midpoint."""
IG_RULES: tuple[str, ...] = get_args(IgRule)
"""A normalized faithfulness target in (0, 1]: the fraction of the full model's metric difference a
circuit must recover (an int such as 1 is accepted, a bool is not)."""
# Read by the rule and `circuits`, not by the ranking: left out of `to_dict` (the settings that
# circuit.json records and hashes).
STAGE_FIELDS = ("n_prompts", "draw_max_edges")


def _increasing(values: tuple[float, ...]) -> tuple[float, ...]:
    if any(b <= a for a, b in pairwise(values)):
        raise ValueError(f"{list(values)!r} must be strictly increasing (sorted, no duplicates)")
    return values


Percentages = Annotated[tuple[Percent, ...], Field(min_length=1), AfterValidator(_increasing)]
"""Budgets of a faithfulness curve: a non-empty, strictly increasing list of percents in (0, 100]
(also `benchmark.percentages`, whose budgets are percents of the restricted edges)."""


@config_model("circuits")
class CircuitConfig(GroupConfig):
    """Minimal faithful circuit of every task (rule `circuits`), MIB conventions."""

    unit: Unit = Field("auto", description="circuit unit: edges (MIB edge graph), nodes (input, heads, MLPs) or "
                       "auto: edges where the model supports edge patching (`model.edge_circuits`), else nodes")
    method: Method = Field(
        "eap-ig", description="ranking method (of edges, or of node activations for node circuits): eap-ig or eap")
    ig_steps: IgSteps = Field(5, description="EAP-IG interpolation points (MIB uses 5)")
    ig_rule: IgRule = Field(
        "left", description="EAP-IG interpolation points: left (t = k/steps, as the reference EAP-IG code) or midpoint")
    target: Target = Field(0.8, description="normalized faithfulness the minimal circuit must reach, in (0, 1], "
                           "e.g. 0.8")
    absolute: StrictBool = Field(True, description="rank by |score| (MIB default) instead of the signed score")
    percentages: Percentages = Field(
        (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0),
        description="strictly increasing budgets of the faithfulness curve / CPR / CMD, in percent of all edges "
        "(or nodes), in (0, 100]")
    n_prompts: StrictInt = Field(16, ge=2, description="prompt pairs used: the first of the task's largest "
                                 "equal-length bucket (>= 2)")
    draw_max_edges: StrictInt = Field(150, ge=1, description="edges (or nodes) drawn in circuit.png (all of them "
                                      "are in circuit.json and circuit.dot)")

    def to_dict(self) -> dict:
        """The ranking and evaluation settings (recorded in circuit.json; `STAGE_FIELDS` are not)."""
        return {k: v for k, v in super().to_dict().items() if k not in STAGE_FIELDS}

    def hash(self) -> str:
        return canonical_hash(self.to_dict())


def checked(setting: str, value: Any) -> Any:
    """`value` of the circuits setting `setting` ("target", "method", "unit", ...) validated by
    `CircuitConfig` itself: the one check of each constraint, for library callers that pass raw
    values. Raises the `ConfigError` that names ``circuits.<setting>`` and what it accepts."""
    return getattr(CircuitConfig(**{setting: value}), setting)


def check_target(target: float) -> float:
    """``circuits.target`` checked as the config checks it (`checked`); returns it as a float."""
    return checked("target", target)
