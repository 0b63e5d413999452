"""Tracking: which weights are watched, per-sample losses, gradients and Hessian-vector products."""
from .influence_model import InfluenceModel, default_process_batch

__all__ = ["InfluenceModel", "default_process_batch"]
