"""Exact IHVP: build the mean Hessian once, invert it, multiply.

.. math::  \\mathrm{ihvp}(v) = (H + \\lambda I)^{+} v

With ``λ = 0`` the Moore-Penrose pseudo-inverse is used (as in Influenciae), which is the exact
answer whenever ``v`` lies in the range of ``H`` — for instance gradients of a softmax
cross-entropy, whose Hessian is always singular along the "add a constant to every logit"
direction. With ``λ > 0`` the damped matrix is inverted and must be non-singular.

Cost: one pass over the Hessian dataset — the jacobian of each batch's summed gradient when
P ≤ 512, else P Hessian-vector products per batch; never a per-sample Hessian (or, with
``hessian="gauss_newton"``, the closed form of a last softmax Dense layer) — then O(P²) memory
and one O(P³) eigendecomposition (done in float64).
Koh & Liang, "Understanding Black-box Predictions via Influence Functions", ICML 2017.
"""
import numpy as np
import tensorflow as tf

from ..common.errors import NonFiniteError, SingularHessianError
from ..model.influence_model import InfluenceModel
from .base import InverseHessianVectorProduct
from .hessian import HessianOperator, gauss_newton_hessian


def pseudo_inverse(matrix: np.ndarray, damping: float) -> np.ndarray:
    """Inverse of the symmetric ``matrix + damping·I`` via its eigendecomposition (float64).

    With ``damping == 0`` eigenvalues with magnitude below ``10·P·ε₃₂·max|λ|`` (``tf.linalg.pinv``'s
    default cut-off, as in Influenciae) are dropped: the pseudo-inverse. With ``damping > 0`` the
    damped matrix must be invertible: an eigenvalue within ``10·ε₃₂·max(max|λ|, damping)`` of zero
    (a negative curvature cancelling the damping) is an error.
    """
    dim = matrix.shape[0]
    eigenvalues, eigenvectors = np.linalg.eigh(matrix.astype(np.float64) + damping * np.eye(dim))
    scale = max(float(np.max(np.abs(eigenvalues))) if dim else 0.0, damping)
    relative_cutoff = 10.0 * np.finfo(np.float32).eps * (dim if damping == 0 else 1)
    cutoff = relative_cutoff * scale
    kept = np.abs(eigenvalues) > cutoff
    if damping > 0 and not kept.all():
        raise SingularHessianError(
            f"H + {damping}·I is singular ({int((~kept).sum())} eigenvalues within {cutoff:.2e} of zero; "
            "the Hessian has negative eigenvalues that cancel the damping). Increase damping."
        )
    inverse_eigenvalues = np.where(kept, 1.0 / np.where(kept, eigenvalues, 1.0), 0.0)
    return (eigenvectors * inverse_eigenvalues) @ eigenvectors.T


class ExactIHVP(InverseHessianVectorProduct):
    """IHVP with the exact (pseudo-)inverse of the mean Hessian of the watched weights.

    Parameters
    ----------
    model
        The InfluenceModel whose watched weights define the Hessian.
    train_dataset
        Batched dataset over which the Hessian is averaged. Give this or ``train_hessian``.
    train_hessian
        A precomputed ``(P, P)`` Hessian (e.g. from a larger dataset). Give this or ``train_dataset``.
    damping
        λ ≥ 0. ``0`` uses the pseudo-inverse; ``λ > 0`` inverts ``H + λI``.
    show_progress
        Show a progress bar while building the Hessian.
    hessian
        How ``H`` is built from ``train_dataset``: ``"exact"`` (default) from the jacobian of
        each batch's gradient (or Hessian-vector products), any model; ``"gauss_newton"``
        in closed form for a single last Dense layer under softmax cross-entropy, where it
        equals the exact Hessian (see :func:`~influence_lib.curvature.hessian.gauss_newton_hessian`).

    Attributes
    ----------
    hessian
        The mean Hessian ``H``, shape ``(P, P)`` (without damping).
    inv_hessian
        ``(H + λI)⁺``, shape ``(P, P)``.
    """

    def __init__(
        self,
        model: InfluenceModel,
        train_dataset: tf.data.Dataset | None = None,
        train_hessian: tf.Tensor | np.ndarray | None = None,
        damping: float = 0.0,
        show_progress: bool = True,
        hessian: str = "exact",
    ):
        super().__init__(model, train_dataset, damping)
        if (train_dataset is None) == (train_hessian is None):
            raise ValueError("Give exactly one of train_dataset (to compute the Hessian) or train_hessian.")
        if hessian not in ("exact", "gauss_newton"):
            raise ValueError(f"hessian must be 'exact' or 'gauss_newton', got {hessian!r}.")
        if hessian == "gauss_newton" and train_dataset is None:
            raise ValueError("hessian='gauss_newton' builds the Hessian from train_dataset; give train_dataset.")
        if train_dataset is not None and hessian == "gauss_newton":
            hessian = gauss_newton_hessian(model, train_dataset, show_progress).numpy()
        elif train_dataset is not None:
            hessian = HessianOperator(model, train_dataset, show_progress).dense().numpy()
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
        dtype = model.dtype
        self.hessian = tf.constant(hessian, dtype=dtype)
        self.inv_hessian = tf.constant(pseudo_inverse(hessian, self.damping), dtype=dtype)

    def ihvp(self, vectors: tf.Tensor) -> tf.Tensor:
        return tf.matmul(self.check_vectors(vectors), self.inv_hessian)

    def hvp(self, vectors: tf.Tensor) -> tf.Tensor:
        vectors = self.check_vectors(vectors)
        return tf.matmul(vectors, self.hessian) + self.damping * vectors
