"""Scores: the calculators that turn gradients and curvature into influence values."""
from .base import BaseInfluenceCalculator, InfluenceBatches, SelfInfluenceCalculator, extract_only_values
from .first_order import FirstOrderInfluenceCalculator

__all__ = [
    "BaseInfluenceCalculator",
    "FirstOrderInfluenceCalculator",
    "InfluenceBatches",
    "SelfInfluenceCalculator",
    "extract_only_values",
]
