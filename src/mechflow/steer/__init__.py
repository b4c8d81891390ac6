"""Interventions: contrast directions, feature clamps, strength sweeps with side effects, records."""

from mechflow.steer.config import SteerConfig
from mechflow.steer.stage import steer

__all__ = ["SteerConfig", "steer"]
