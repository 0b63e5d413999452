"""Tracking: which weights are watched, per-sample losses, gradients and Hessian-vector products."""
from .influence_model import BaseInfluenceModel, InfluenceModel, default_process_batch

__all__ = ["BaseInfluenceModel", "InfluenceModel", "default_process_batch"]
