"""Typed config of the circuits stage (Hydra group ``circuits``, `config/circuits/default.yaml`).

`workflow/schemas/config/circuits.schema.json` is generated from `CircuitConfig`.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, Field, StrictBool, StrictFloat, StrictInt

from mechflow.config import GroupConfig, config_model
from mechflow.io import canonical_hash

Unit = Literal["edges", "nodes", "auto"]
UNITS: tuple[str, ...] = get_args(Unit)
Percent = Annotated[StrictFloat, Field(gt=0, le=100)]
# Read by the rule and `run_circuit`, not by the ranking: left out of `to_dict` (the settings that
# circuit.json records and hashes).
STAGE_FIELDS = ("n_prompts", "draw_max_edges")


def _increasing(values: tuple[float, ...]) -> tuple[float, ...]:
    if any(b <= a for a, b in pairwise(values)):
        raise ValueError(f"{list(values)!r} must be strictly increasing (sorted, no duplicates)")
    return values


@config_model("circuits")
class CircuitConfig(GroupConfig):
    """Minimal faithful circuit of every task (rule `circuits`), MIB conventions."""

    unit: Unit = Field("auto", description="circuit unit: edges (MIB edge graph), nodes (input, heads, MLPs) or "
                       "auto: edges where the model supports edge patching (`model.edge_circuits`), else nodes")
    method: Literal["eap-ig", "eap"] = Field(
        "eap-ig", description="ranking method (of edges, or of node activations for node circuits): eap-ig or eap")
    ig_steps: StrictInt = Field(5, ge=1, description="EAP-IG interpolation points (MIB uses 5)")
    ig_rule: Literal["left", "midpoint"] = Field(
        "left", description="EAP-IG interpolation points: left (t = k/steps, as the reference EAP-IG code) or midpoint")
    target: StrictFloat = Field(0.8, gt=0, le=1, description="normalized faithfulness the minimal circuit must "
                                "reach, in (0, 1], e.g. 0.8")
    absolute: StrictBool = Field(True, description="rank by |score| (MIB default) instead of the signed score")
    percentages: Annotated[tuple[Percent, ...], AfterValidator(_increasing)] = Field(
        (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0), min_length=1,
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
