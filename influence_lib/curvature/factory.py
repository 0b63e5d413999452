"""Choose an IHVP calculator by name (``'exact' | 'cgd' | 'lissa' | 'arnoldi' | 'kfac' | 'ekfac'``), enum, or
factory object.

Built from a name or enum member, each calculator uses its default settings: the Gauss-Newton
curvature for built-in Keras losses (``curvature='auto'``) and ``damping='auto'``
(``max(0.1 · tr(H) / P, λ_train)``); for ``'arnoldi'`` a Krylov subspace of ``min(P, 200)`` dimensions with all
its eigenpairs kept. Use the factories to choose others (``damping=0`` for Influenciae's).
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum

import tensorflow as tf

from ..common.progress import quieted
from ..model.influence_model import InfluenceModel
from .arnoldi import ArnoldiIHVP
from .base import InverseHessianVectorProduct
from .conjugate_gradient import ConjugateGradientDescentIHVP
from .exact import ExactIHVP
from .kfac import EKFACIHVP, KFACIHVP
from .lissa import LissaIHVP


class IHVPCalculator(Enum):
    """The IHVP calculators, as in Influenciae: ``IHVPCalculator.Exact.value(model, dataset)`` builds one."""

    Exact = ExactIHVP
    Cgd = ConjugateGradientDescentIHVP
    Lissa = LissaIHVP
    Arnoldi = ArnoldiIHVP
    Kfac = KFACIHVP
    Ekfac = EKFACIHVP

    @staticmethod
    def from_string(ihvp_calculator: str) -> "IHVPCalculator":
        """``'exact'``, ``'cgd'``, ``'lissa'``, ``'arnoldi'``, ``'kfac'`` or ``'ekfac'`` (case-insensitive) to the
        enum member."""
        members = {
            "exact": IHVPCalculator.Exact,
            "cgd": IHVPCalculator.Cgd,
            "lissa": IHVPCalculator.Lissa,
            "arnoldi": IHVPCalculator.Arnoldi,
            "kfac": IHVPCalculator.Kfac,
            "ekfac": IHVPCalculator.Ekfac,
        }
        key = str(ihvp_calculator).lower()
        if key not in members:
            raise ValueError(f"Unknown IHVP calculator {ihvp_calculator!r}; choose one of {sorted(members)}.")
        return members[key]


class InverseHessianVectorProductFactory(ABC):
    """Builds an IHVP calculator for a model and a Hessian dataset (used where one is built per model)."""

    @abstractmethod
    def build(self, model: InfluenceModel, dataset: tf.data.Dataset) -> InverseHessianVectorProduct:
        """Create the calculator for ``model`` with its Hessian averaged over ``dataset``."""


@dataclass(frozen=True)
class ExactIHVPFactory(InverseHessianVectorProductFactory):
    """Builds :class:`ExactIHVP` with the given damping and curvature."""

    damping: "float | str" = "auto"
    show_progress: bool = True
    curvature: str = "auto"

    def build(self, model: InfluenceModel, dataset: tf.data.Dataset) -> ExactIHVP:
        return ExactIHVP(
            model, dataset, damping=self.damping, show_progress=self.show_progress, curvature=self.curvature
        )


@dataclass(frozen=True)
class CGDIHVPFactory(InverseHessianVectorProductFactory):
    """Builds :class:`ConjugateGradientDescentIHVP` with the given settings."""

    n_opt_iters: int = 100
    damping: "float | str" = "auto"
    tolerance: float = 1e-5
    show_progress: bool = False
    curvature: str = "auto"
    preconditioner: str | None = None

    def build(self, model: InfluenceModel, dataset: tf.data.Dataset) -> ConjugateGradientDescentIHVP:
        return ConjugateGradientDescentIHVP(
            model, dataset, self.n_opt_iters, self.damping, self.tolerance, show_progress=self.show_progress,
            curvature=self.curvature, preconditioner=self.preconditioner,
        )


@dataclass(frozen=True)
class LissaIHVPFactory(InverseHessianVectorProductFactory):
    """Builds :class:`LissaIHVP` with the given settings."""

    n_opt_iters: int = 100
    damping: "float | str" = "auto"
    scale: "float | str" = "auto"
    show_progress: bool = False
    curvature: str = "auto"
    batches_per_iteration: int | None = None

    def build(self, model: InfluenceModel, dataset: tf.data.Dataset) -> LissaIHVP:
        return LissaIHVP(
            model, dataset, self.n_opt_iters, self.damping, self.scale, show_progress=self.show_progress,
            curvature=self.curvature, batches_per_iteration=self.batches_per_iteration,
        )


@dataclass(frozen=True)
class ArnoldiIHVPFactory(InverseHessianVectorProductFactory):
    """Builds :class:`ArnoldiIHVP` with the given settings (``None`` sizes: see :class:`ArnoldiIHVP`)."""

    subspace_dim: int | None = None
    k_largest_eig_vals: int | None = None
    force_hermitian: bool = True
    damping: "float | str" = "auto"
    seed: int = 0
    show_progress: bool = True
    curvature: str = "auto"

    def build(self, model: InfluenceModel, dataset: tf.data.Dataset) -> ArnoldiIHVP:
        return ArnoldiIHVP(
            model,
            dataset,
            subspace_dim=self.subspace_dim,
            force_hermitian=self.force_hermitian,
            k_largest_eig_vals=self.k_largest_eig_vals,
            damping=self.damping,
            seed=self.seed,
            show_progress=self.show_progress,
            curvature=self.curvature,
        )


@dataclass(frozen=True)
class KFACIHVPFactory(InverseHessianVectorProductFactory):
    """Builds :class:`KFACIHVP` (or :class:`EKFACIHVP` with ``corrected_eigenvalues=True``)."""

    damping: float | str = "heuristic"
    fisher: str = "empirical"
    corrected_eigenvalues: bool = False
    seed: int = 0
    factors_path: str | None = None
    show_progress: bool = True

    def build(self, model: InfluenceModel, dataset: tf.data.Dataset) -> KFACIHVP:
        kind = EKFACIHVP if self.corrected_eigenvalues else KFACIHVP
        return kind(
            model, dataset, damping=self.damping, fisher=self.fisher, seed=self.seed,
            factors_path=self.factors_path, show_progress=self.show_progress,
        )


def make_ihvp(
    calculator: "str | IHVPCalculator | InverseHessianVectorProduct | InverseHessianVectorProductFactory",
    model: InfluenceModel,
    dataset: tf.data.Dataset,
    show_progress: bool = True,
) -> InverseHessianVectorProduct:
    """Resolve ``calculator`` (name, enum member, factory, or ready instance) into an IHVP calculator.

    Names and enum members build the calculator with its default settings.
    """
    if isinstance(calculator, InverseHessianVectorProduct):
        if calculator.model is not model:
            raise ValueError("The IHVP calculator was built for another InfluenceModel than the calculator's.")
        return calculator
    if isinstance(calculator, InverseHessianVectorProductFactory):
        return quieted(calculator, show_progress).build(model, dataset)
    if isinstance(calculator, str):
        calculator = IHVPCalculator.from_string(calculator)
    if isinstance(calculator, IHVPCalculator):
        return calculator.value(model, dataset, show_progress=show_progress)
    raise TypeError(
        "ihvp_calculator must be 'exact', 'cgd', 'lissa', 'arnoldi', 'kfac', 'ekfac', an IHVPCalculator, an "
        f"InverseHessianVectorProduct or an InverseHessianVectorProductFactory; got {calculator!r}."
    )
