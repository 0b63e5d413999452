"""Scores: the calculators that turn gradients and curvature into influence values."""
from .arnoldi import ArnoldiInfluenceCalculator
from .base import BaseInfluenceCalculator, InfluenceBatches, SelfInfluenceCalculator, extract_only_values
from .first_order import FirstOrderInfluenceCalculator
from .group import FirstOrderGroupInfluence, GroupInfluence
from .results import NumpyResult, to_numpy
from .second_order import SecondOrderInfluenceCalculator

__all__ = [
    "ArnoldiInfluenceCalculator",
    "BaseInfluenceCalculator",
    "FirstOrderGroupInfluence",
    "FirstOrderInfluenceCalculator",
    "GroupInfluence",
    "InfluenceBatches",
    "NumpyResult",
    "SecondOrderInfluenceCalculator",
    "SelfInfluenceCalculator",
    "extract_only_values",
    "to_numpy",
]
