"""Curvature: the mean Hessian as an operator and the inverse-Hessian-vector-product calculators."""
from .arnoldi import ArnoldiIHVP, arnoldi_iteration
from .base import InverseHessianVectorProduct
from .conjugate_gradient import ConjugateGradientDescentIHVP, batched_conjugate_gradient
from .exact import ExactIHVP
from .forward_over_backward import ForwardOverBackwardHVP
from .factory import (
    ArnoldiIHVPFactory,
    CGDIHVPFactory,
    ExactIHVPFactory,
    IHVPCalculator,
    InverseHessianVectorProductFactory,
    KFACIHVPFactory,
    LissaIHVPFactory,
    make_ihvp,
)
from .gauss_newton import GaussNewtonProduct
from .hessian import HessianOperator, gauss_newton_hessian
from .iterative import IterativeIHVP
from .kfac import EKFACIHVP, KFACIHVP
from .kfac_storage import LayerFactors
from .lissa import LissaIHVP
from .spectrum import early_stopping_damping

__all__ = [
    "ArnoldiIHVP",
    "ArnoldiIHVPFactory",
    "CGDIHVPFactory",
    "EKFACIHVP",
    "ConjugateGradientDescentIHVP",
    "ExactIHVP",
    "ExactIHVPFactory",
    "ForwardOverBackwardHVP",
    "GaussNewtonProduct",
    "HessianOperator",
    "IHVPCalculator",
    "InverseHessianVectorProduct",
    "InverseHessianVectorProductFactory",
    "IterativeIHVP",
    "KFACIHVP",
    "KFACIHVPFactory",
    "LayerFactors",
    "LissaIHVP",
    "LissaIHVPFactory",
    "arnoldi_iteration",
    "batched_conjugate_gradient",
    "early_stopping_damping",
    "gauss_newton_hessian",
    "make_ihvp",
]
