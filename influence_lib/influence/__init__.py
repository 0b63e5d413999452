"""Scores: the calculators that turn gradients and curvature into influence values."""
from .arnoldi import ArnoldiInfluenceCalculator
from .base import BaseInfluenceCalculator, InfluenceBatches, SelfInfluenceCalculator, extract_only_values
from .first_order import FirstOrderInfluenceCalculator
from .grad_similarity import GradCos, GradDot
from .group import FirstOrderGroupInfluence, GroupInfluence
from .results import NumpyResult, to_numpy
from .second_order import SecondOrderInfluenceCalculator
from .trak import TRAK

__all__ = [
    "ArnoldiInfluenceCalculator",
    "BaseInfluenceCalculator",
    "FirstOrderGroupInfluence",
    "FirstOrderInfluenceCalculator",
    "GradCos",
    "GradDot",
    "GroupInfluence",
    "InfluenceBatches",
    "NumpyResult",
    "SecondOrderInfluenceCalculator",
    "SelfInfluenceCalculator",
    "TRAK",
    "extract_only_values",
    "to_numpy",
]
