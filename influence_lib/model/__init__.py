"""Tracking: which weights are watched, per-sample losses, gradients and Hessian-vector products."""
from .influence_model import BaseInfluenceModel, InfluenceModel, default_process_batch
from .projection import GradientProjector, Projection

__all__ = ["BaseInfluenceModel", "GradientProjector", "InfluenceModel", "Projection", "default_process_batch"]
