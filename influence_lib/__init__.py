"""influence_lib: which training samples made a TensorFlow / Keras 3 model behave as it does.

The pipeline is visible in the sub-packages: ``model`` (which weights are watched, per-sample
gradients), ``curvature`` (Hessian operator and inverse-Hessian-vector products), ``influence``
(the calculators that turn gradients and curvature into scores).
"""
from .common import (
    CACHE,
    ORDER,
    DataParallel,
    InsufficientMemoryError,
    NonFiniteError,
    RowShards,
    SingularHessianError,
    StreamingTopK,
    TopK,
    padded_shards,
    using_strategy,
)
from .curvature import (
    ArnoldiIHVP,
    ArnoldiIHVPFactory,
    CGDIHVPFactory,
    ConjugateGradientDescentIHVP,
    EKFACIHVP,
    ExactIHVP,
    ExactIHVPFactory,
    ForwardOverBackwardHVP,
    GaussNewtonProduct,
    HessianOperator,
    IHVPCalculator,
    InverseHessianVectorProduct,
    InverseHessianVectorProductFactory,
    KFACIHVP,
    KFACIHVPFactory,
    LissaIHVP,
    LissaIHVPFactory,
    early_stopping_damping,
    gauss_newton_hessian,
)
from .influence import (
    BaseInfluenceCalculator,
    FirstOrderInfluenceCalculator,
    GradCos,
    GradDot,
    InfluenceBatches,
    KroneckerInfluenceCalculator,
    NumpyResult,
    SelfInfluenceCalculator,
    extract_only_values,
    to_numpy,
)
from .influence.arnoldi import ArnoldiInfluenceCalculator
from .influence.boundary_sample import SampleBoundaryCalculator
from .influence.boundary_weights import WeightsBoundaryCalculator
from .influence.representer_l2 import RepresenterPointL2
from .influence.representer_lje import RepresenterPointLJE
from .influence.second_order import SecondOrderInfluenceCalculator
from .influence.tracin import TracIn
from .influence.trak import TRAK
from .influence.tracin_checkpoint import TracInCheckpoint
from . import utils
from .model import BaseInfluenceModel, GradientProjector, InfluenceModel, Projection, default_process_batch

__version__ = "0.3.0"

__all__ = [
    "CACHE",
    "ORDER",
    "ArnoldiIHVP",
    "ArnoldiIHVPFactory",
    "ArnoldiInfluenceCalculator",
    "BaseInfluenceCalculator",
    "BaseInfluenceModel",
    "CGDIHVPFactory",
    "DataParallel",
    "ConjugateGradientDescentIHVP",
    "EKFACIHVP",
    "ExactIHVP",
    "ExactIHVPFactory",
    "FirstOrderInfluenceCalculator",
    "ForwardOverBackwardHVP",
    "GaussNewtonProduct",
    "GradCos",
    "GradDot",
    "GradientProjector",
    "HessianOperator",
    "IHVPCalculator",
    "InfluenceBatches",
    "InfluenceModel",
    "InsufficientMemoryError",
    "InverseHessianVectorProduct",
    "InverseHessianVectorProductFactory",
    "KFACIHVP",
    "KFACIHVPFactory",
    "KroneckerInfluenceCalculator",
    "LissaIHVP",
    "LissaIHVPFactory",
    "NonFiniteError",
    "Projection",
    "RepresenterPointL2",
    "RepresenterPointLJE",
    "RowShards",
    "SampleBoundaryCalculator",
    "SecondOrderInfluenceCalculator",
    "SelfInfluenceCalculator",
    "SingularHessianError",
    "TRAK",
    "StreamingTopK",
    "TopK",
    "TracIn",
    "TracInCheckpoint",
    "WeightsBoundaryCalculator",
    "default_process_batch",
    "early_stopping_damping",
    "extract_only_values",
    "to_numpy",
    "NumpyResult",
    "gauss_newton_hessian",
    "padded_shards",
    "using_strategy",
]
