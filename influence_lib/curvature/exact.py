"""Exact IHVP: build the mean curvature matrix once, invert it, multiply.

.. math::  \\mathrm{ihvp}(v) = (H + \\delta I)^{-1} v, \\qquad \\delta = 0.1 \\cdot \\operatorname{tr}(H) / P
           \\ \\text{by default}

``H`` is the Gauss-Newton matrix (``curvature='auto'``; it equals the Hessian when the watched
weights are the output layer, see :mod:`~influence_lib.curvature.gauss_newton`) or the Hessian
(``curvature='hessian'``). The default damping ``δ`` is one tenth of the mean eigenvalue of ``H``
(:mod:`~influence_lib.curvature.spectrum`): it does not grow with the number of parameters ``P``
and keeps every direction the data determines. With ``damping=0`` the Moore-Penrose
pseudo-inverse is used, dropping every eigenvalue with ``|λ| ≤ 10·P·ε₃₂·max|λ|``
(``tf.linalg.pinv``'s default cut-off, as in Influenciae): at large ``P`` that keeps only the top
of the spectrum (e.g. 45 of the 6,730 eigenvalues above 1e-6 of a 784→10 logistic regression,
P = 7,850), so it is a strong spectral truncation rather than the exact inverse.

Cost: where it is exact — the watched weights are one Dense output layer on fixed inputs under
softmax or sigmoid cross-entropy or mean squared error, including every weight of a linear model —
the matrix comes in closed form from one forward pass per batch
(:func:`~influence_lib.curvature.hessian.gauss_newton_hessian`); otherwise from blocks of 512
Hessian- (or Gauss-Newton-) vector products per pass over each batch. Then O(P²) memory (checked
before starting) and one O(P³) eigendecomposition (float64).
Koh & Liang, "Understanding Black-box Predictions via Influence Functions", ICML 2017.
"""
import numpy as np
import tensorflow as tf

from ..common.errors import NonFiniteError, SingularHessianError
from ..common.memory import check_memory
from ..model.influence_model import InfluenceModel
from .base import InverseHessianVectorProduct
from .hessian import HessianOperator, closed_form_refusal, gauss_newton_hessian, resolve_curvature
from .spectrum import resolve_damping

# Peak bytes per entry of the P × P matrix: float64 matrix, eigenvectors and inverse, two float32 copies.
_BYTES_PER_HESSIAN_ENTRY = 32


def pseudo_inverse(matrix: np.ndarray, damping: float) -> np.ndarray:
    """Inverse of the symmetric ``matrix + damping·I`` via its eigendecomposition (float64).

    With ``damping == 0`` eigenvalues with magnitude below ``10·P·ε₃₂·max|λ|`` (``tf.linalg.pinv``'s
    default cut-off, as in Influenciae) are dropped: the pseudo-inverse. With ``damping > 0`` the
    damped matrix must be invertible: an eigenvalue within ``10·ε₃₂·max(max|λ|, damping)`` of zero
    (a negative curvature cancelling the damping) is an error.
    """
    dim = matrix.shape[0]
    eigenvalues, eigenvectors = np.linalg.eigh(matrix.astype(np.float64))
    eigenvalues = eigenvalues + damping
    scale = max(float(np.max(np.abs(eigenvalues))) if dim else 0.0, damping)
    relative_cutoff = 10.0 * np.finfo(np.float32).eps * (dim if damping == 0 else 1)
    cutoff = relative_cutoff * scale
    kept = np.abs(eigenvalues) > cutoff
    if damping > 0 and not kept.all():
        raise SingularHessianError(
            f"H + {damping}·I is singular ({int((~kept).sum())} eigenvalues within {cutoff:.2e} of zero; "
            "the Hessian has negative eigenvalues that cancel the damping). Increase damping, or use curvature='ggn'."
        )
    inverse_eigenvalues = np.where(kept, 1.0 / np.where(kept, eigenvalues, 1.0), 0.0)
    return (eigenvectors * inverse_eigenvalues) @ eigenvectors.T


def check_dense_memory(nb_params: int) -> None:
    """Refuse a dense ``P × P`` curvature matrix that would not fit in memory, naming the alternatives."""
    check_memory(
        _BYTES_PER_HESSIAN_ENTRY * float(nb_params) ** 2,
        f"ExactIHVP's dense {nb_params} × {nb_params} curvature matrix (and its eigendecomposition)",
        "Use a matrix-free calculator instead: 'cgd' (conjugate gradient), 'lissa', 'arnoldi' (top eigenspace) or "
        "'ekfac' where available, or watch fewer weights (e.g. only the last layer).",
    )


class ExactIHVP(InverseHessianVectorProduct):
    """IHVP with the exact inverse of the damped mean curvature matrix of the watched weights.

    Parameters
    ----------
    model
        The InfluenceModel whose watched weights define the curvature.
    train_dataset
        Batched dataset over which the curvature is averaged. Give this or ``train_hessian``.
    train_hessian
        A precomputed ``(P, P)`` curvature matrix (e.g. from a larger dataset). Give this or
        ``train_dataset``.
    damping
        ``'auto'`` (default): ``δ = max(0.1 · tr(H) / P, λ_train)``. A number ``δ > 0`` inverts ``H + δI``;
        ``0`` uses the pseudo-inverse with ``tf.linalg.pinv``'s cut-off (Influenciae's behaviour,
        a strong truncation at large P — see the module docstring).
    show_progress
        Show a progress bar while building the matrix.
    curvature
        ``'auto'`` (default): the Gauss-Newton matrix for a single-output model with a built-in
        Keras loss, else the Hessian; ``'ggn'``: the Gauss-Newton matrix (equal to the Hessian
        for an output layer alone); ``'hessian'``: the Hessian of the loss (indefinite through
        hidden layers). Where the two coincide in closed form it is used automatically.
    hessian
        Earlier spelling, kept working: ``'exact'`` is ``curvature='hessian'``; ``'gauss_newton'``
        requires the closed form (a ``ValueError`` naming ``hessian='gauss_newton'`` where it does not
        apply). ``None`` (default): use ``curvature``.

    Attributes
    ----------
    hessian
        The mean curvature matrix ``H``, shape ``(P, P)`` (without damping).
    inv_hessian
        ``(H + δI)⁻¹`` (or ``H⁺``), shape ``(P, P)``.
    damping
        The damping ``δ`` used (the resolved number when ``'auto'`` was given).
    curvature
        ``'hessian'`` or ``'ggn'``: the matrix used.

    Raises
    ------
    InsufficientMemoryError
        Before building, when the dense matrix and its eigendecomposition would not fit in memory.
    """

    def __init__(
        self,
        model: InfluenceModel,
        train_dataset: tf.data.Dataset | None = None,
        train_hessian: tf.Tensor | np.ndarray | None = None,
        damping: "float | str" = "auto",
        show_progress: bool = True,
        curvature: str = "auto",
        hessian: str | None = None,
    ):
        super().__init__(model, train_dataset, damping)
        if (train_dataset is None) == (train_hessian is None):
            raise ValueError("Give exactly one of train_dataset (to compute the Hessian) or train_hessian.")
        if hessian not in (None, "exact", "gauss_newton"):
            raise ValueError(f"hessian must be 'exact' or 'gauss_newton' (or use curvature=...), got {hessian!r}.")
        if hessian == "gauss_newton" and (train_dataset is None or closed_form_refusal(model) is not None):
            reason = "no train_dataset was given" if train_dataset is None else closed_form_refusal(model)
            raise ValueError(f"hessian='gauss_newton' needs the closed form, which does not apply: {reason}.")
        self.curvature = resolve_curvature(model, "hessian" if hessian == "exact" else curvature)
        check_dense_memory(model.nb_params)
        if train_dataset is not None and closed_form_refusal(model) is None:
            hessian = gauss_newton_hessian(model, train_dataset, show_progress).numpy()
        elif train_dataset is not None:
            operator = HessianOperator(model, train_dataset, show_progress, curvature=self.curvature)
            hessian = operator.dense().numpy()
        else:
            hessian = np.asarray(train_hessian)
            if hessian.shape != (model.nb_params, model.nb_params):
                raise ValueError(
                    f"train_hessian must have shape ({model.nb_params}, {model.nb_params}) — the number of "
                    f"watched parameters — got {hessian.shape}."
                )
            if not np.isfinite(hessian).all():
                raise NonFiniteError("train_hessian contains NaN or infinite values.")
            hessian = 0.5 * (hessian + hessian.T)
        self.damping = resolve_damping(self.damping, lambda: float(np.trace(hessian)) / model.nb_params, model)
        dtype = model.dtype
        self.hessian = tf.constant(hessian, dtype=dtype)
        self.inv_hessian = tf.constant(pseudo_inverse(hessian, self.damping), dtype=dtype)

    def ihvp(self, vectors: tf.Tensor) -> tf.Tensor:
        return tf.matmul(self.check_vectors(vectors), self.inv_hessian)

    def hvp(self, vectors: tf.Tensor) -> tf.Tensor:
        vectors = self.check_vectors(vectors)
        return tf.matmul(vectors, self.hessian) + self.damping * vectors
