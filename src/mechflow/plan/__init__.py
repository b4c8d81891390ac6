"""Plan a run's time, memory and disk from measured per-token costs (`mechflow plan`), and size the
workflow's per-rule cluster resources from the same arithmetic."""

from mechflow.plan.costs import load_costs
from mechflow.plan.estimate import StageEstimate, harvest_estimate, training_estimate
from mechflow.plan.shapes import PRESETS, ModelShape, preset, shape_of_model

__all__ = ["PRESETS", "ModelShape", "StageEstimate", "harvest_estimate", "load_costs", "preset", "shape_of_model",
           "training_estimate"]
