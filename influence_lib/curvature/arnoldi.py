"""Arnoldi IHVP: invert the mean Hessian on the span of its dominant eigenvectors.

Schioppa, Zablotskaia, Vilar & Sokolov, "Scaling Up Influence Functions", AAAI 2022.

The Arnoldi iteration with full re-orthogonalization builds an orthonormal basis
``W = (w_1, …, w_m)`` (rows, shape ``(m, P)``) of the Krylov subspace
``span(w_1, H w_1, …, H^{m-1} w_1)`` of the mean Hessian ``H`` together with the projected
matrix ``A = W H Wᵀ`` (``m × m``, tridiagonal in exact arithmetic since ``H`` is symmetric).
Each step costs ONE Hessian-vector product of the whole dataset (batched, never per sample).
Diagonalizing the small matrix, ``A = Y Λ Y⁻¹``, gives approximate eigenpairs of ``H``; the
``k`` eigenvalues of LARGEST magnitude are kept (the well-converged end of the Arnoldi
spectrum, which also dominates the influence) with their eigenvectors ``G = Y_kᵀ W``
(rows, ``(k, P)``) and the inverse is restricted to their span:

.. math::  \\mathrm{ihvp}(v) = G^\\top\\, \\mathrm{diag}\\big(1 / (\\lambda_j + \\delta)\\big)\\, \\tilde G\\, v

where ``δ`` is the damping and ``G̃ = (Y⁻¹)_k W`` the dual vectors (``G̃ = G`` when
``force_hermitian``: ``A`` is symmetrized and diagonalized with ``eigh``, ``Y`` orthogonal).
With ``m = k = P`` this is the exact inverse (pseudo-inverse when ``H`` is singular).
"""
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from ..common.compiled import compiled_function
from ..common.distribute import local_variable
from ..common.errors import NonFiniteError, SingularHessianError
from ..common.progress import progress
from ..model.influence_model import InfluenceModel
from .base import InverseHessianVectorProduct
from .hessian import HessianOperator
from .spectrum import hutchinson_mean_eigenvalue, resolve_damping

DEFAULT_SUBSPACE_DIM = 200
# Ritz values below this multiple of the rounding noise measured in the Arnoldi matrix are noise.
_NOISE_MULTIPLE = 10.0

MatMat = Callable[[tf.Tensor], tf.Tensor]


@compiled_function
def _orthogonalize(basis: tf.Tensor, count: tf.Tensor, vector: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Remove from ``vector`` its components on the first ``count`` rows of ``basis``.

    Classical Gram-Schmidt applied twice ("twice is enough"), which keeps the basis orthonormal
    to working precision. Returns the coefficients (``count``,) and the residual vector.
    """
    active = basis[:count]
    coefficients = tf.linalg.matvec(active, vector)
    vector = vector - tf.linalg.matvec(active, coefficients, transpose_a=True)
    correction = tf.linalg.matvec(active, vector)
    vector = vector - tf.linalg.matvec(active, correction, transpose_a=True)
    return coefficients + correction, vector


def arnoldi_iteration(
    matmat: MatMat,
    start_vector: tf.Tensor,
    subspace_dim: int,
    seed: int = 0,
    show_progress: bool = False,
) -> tuple[tf.Tensor, np.ndarray]:
    """Arnoldi iteration with full re-orthogonalization on a symmetric operator.

    Parameters
    ----------
    matmat
        ``V (k, P) ↦ H V`` applied to the rows of ``V`` (called with one row at a time).
    start_vector
        First Krylov vector, shape ``(P,)``; its dtype is the dtype of the basis.
    subspace_dim
        Number ``m ≤ P`` of basis vectors.
    seed
        Seed of the random vectors that restart the iteration when the Krylov subspace becomes
        invariant before ``m`` vectors (e.g. a singular or low-rank ``H``).
    show_progress
        Show a progress bar over the ``m`` Hessian-vector products.

    Returns
    -------
    basis
        ``W``, shape ``(m, P)``, orthonormal rows.
    projected
        ``A = W H Wᵀ`` as produced by the recurrence, shape ``(m, m)``, float64, upper Hessenberg.
    """
    dim = int(start_vector.shape[0])
    if not 1 <= subspace_dim <= dim:
        raise ValueError(f"subspace_dim must be between 1 and the dimension {dim}, got {subspace_dim}.")
    dtype = start_vector.dtype
    rng = np.random.default_rng(seed)
    norm = tf.norm(start_vector)
    if not float(norm) > 0.0:
        raise ValueError("The Arnoldi start vector must be non-zero and finite.")
    basis = local_variable(tf.zeros((subspace_dim, dim), dtype=dtype))
    basis[0].assign(start_vector / norm)
    projected = np.zeros((subspace_dim, subspace_dim), dtype=np.float64)
    breakdown_tolerance = 100.0 * np.finfo(dtype.as_numpy_dtype).eps
    for step in progress(range(subspace_dim), show_progress, "Arnoldi iteration", subspace_dim):
        image = tf.cast(tf.reshape(matmat(basis[step][None]), [-1]), dtype)
        if not bool(tf.reduce_all(tf.math.is_finite(image))):
            raise NonFiniteError("A Hessian-vector product is NaN or infinite: check the model's loss on the data.")
        coefficients, residual = _orthogonalize(basis, tf.constant(step + 1), image)
        projected[: step + 1, step] = coefficients.numpy()
        if step + 1 == subspace_dim:
            break
        residual_norm = float(tf.norm(residual))
        if residual_norm > breakdown_tolerance * float(tf.norm(image)):
            projected[step + 1, step] = residual_norm
            basis[step + 1].assign(residual / residual_norm)
        else:
            basis[step + 1].assign(_random_orthonormal_vector(basis, step + 1, rng))
    return tf.convert_to_tensor(basis), projected


def _random_orthonormal_vector(basis: tf.Variable, count: int, rng: np.random.Generator) -> tf.Tensor:
    """A random unit vector orthogonal to the first ``count`` rows of ``basis`` (restart after breakdown)."""
    dim = int(basis.shape[1])
    while True:
        candidate = tf.constant(rng.standard_normal(dim), dtype=basis.dtype)
        _, candidate = _orthogonalize(basis, tf.constant(count), candidate)
        norm = float(tf.norm(candidate))
        if norm > 1e-3:
            return candidate / norm


def top_eigenpairs(
    projected: np.ndarray, k: int, force_hermitian: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigen-decomposition of the small projected matrix, keeping the ``k`` largest ``|λ|``.

    Parameters
    ----------
    projected
        ``A``, shape ``(m, m)``.
    k
        Number of eigenpairs to keep (those of largest magnitude).
    force_hermitian
        Symmetrize ``A`` and use ``tf.linalg.eigh`` (orthogonal eigenvectors). Otherwise use
        ``tf.linalg.eig`` on ``A`` as is; its eigenvalues must then be real up to rounding.

    Returns
    -------
    eigenvalues
        Shape ``(k,)``, by decreasing magnitude.
    eigenvectors
        ``Y_k``, shape ``(m, k)``: columns are right eigenvectors of ``A``.
    dual_eigenvectors
        ``(Y⁻¹)_k``, shape ``(k, m)``: rows are the matching left eigenvectors (``Y_kᵀ`` when hermitian).
    """
    if force_hermitian:
        symmetric = tf.constant(0.5 * (projected + projected.T), dtype=tf.float64)
        eigenvalues, eigenvectors = tf.linalg.eigh(symmetric)
        eigenvalues, eigenvectors = eigenvalues.numpy(), eigenvectors.numpy()
        dual = eigenvectors.T
    else:
        complex_values, complex_vectors = tf.linalg.eig(tf.constant(projected, dtype=tf.float64))
        complex_values, complex_vectors = complex_values.numpy(), complex_vectors.numpy()
        scale = max(np.abs(complex_values).max(), np.finfo(np.float64).tiny)
        if np.abs(complex_values.imag).max() > 1e-6 * scale:
            raise ValueError(
                "The projected Hessian has complex eigenvalues (the Hessian-vector products are not symmetric "
                "to working precision). Use force_hermitian=True."
            )
        # Eigenvectors of real eigenvalues are real up to a complex phase: remove it before taking real parts.
        pivots = complex_vectors[np.argmax(np.abs(complex_vectors), axis=0), np.arange(complex_vectors.shape[1])]
        complex_vectors = complex_vectors * (np.abs(pivots) / pivots)
        eigenvalues = complex_values.real
        eigenvectors = complex_vectors.real
        dual = np.linalg.inv(complex_vectors).real
    order = np.argsort(-np.abs(eigenvalues), kind="stable")[:k]
    return eigenvalues[order], eigenvectors[:, order], dual[order]


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


class ArnoldiIHVP(InverseHessianVectorProduct):
    """IHVP restricted to the top-``k`` eigenspace of the mean curvature found by Arnoldi.

    See the module docstring for the formula. Ritz values that are rounding noise are dropped when
    ``damping == 0`` — the pseudo-inverse convention — so fewer than ``k`` may remain. The cut-off
    does not grow with the number of parameters ``P``: it is the larger of ``tf.linalg.pinv``'s
    rule for the ``m × m`` matrix actually inverted (``10·m·ε·max|λ|``, ``ε`` of the model's
    dtype) and ten times the rounding noise of the Hessian-vector products, measured in the
    Arnoldi matrix itself (its entries above the first superdiagonal, zero in exact arithmetic
    for a symmetric ``H``). With ``damping > 0`` every kept pair is inverted; only a negative
    eigenvalue ``λ < 0`` that cancels the damping (``λ + δ`` within the cut-off of zero) is an error.

    Parameters
    ----------
    model
        The InfluenceModel whose watched weights define the Hessian.
    train_dataset
        Batched dataset over which the Hessian is averaged (one pass per Arnoldi step).
    subspace_dim
        Dimension ``m`` of the Krylov subspace (``1 ≤ m ≤ P``). ``None``: ``min(P, 200)``.
    force_hermitian
        Symmetrize the projected matrix and diagonalize it with ``eigh`` (recommended: ``H`` is
        symmetric). ``False`` uses a general eigendecomposition of the Arnoldi matrix.
    k_largest_eig_vals
        Number ``k ≤ m`` of eigenvalues of largest magnitude kept. ``None``: all ``m``.
    damping
        δ ≥ 0 added to every kept eigenvalue; ``'auto'`` (default): ``δ = max(0.1 · tr(H) / P, λ_train)``, the
        trace estimated with 32 random probes in one extra pass over the dataset
        (:mod:`~influence_lib.curvature.spectrum`).
    seed
        Seed of the random start vector (and of restarts).
    dtype
        Dtype of the Krylov basis and eigenvectors (``tf.float32`` or ``tf.float64``).
    show_progress
        Show a progress bar over the Arnoldi steps.
    curvature
        ``'auto'`` (default): the Gauss-Newton matrix when the model has a single output (PSD,
        equal to the Hessian for an output layer alone), else the Hessian; ``'ggn'`` or
        ``'hessian'`` to choose (see :func:`~influence_lib.curvature.hessian.resolve_curvature`).

    Attributes
    ----------
    eigenvalues
        Kept eigenvalues ``λ_j`` of ``H`` (without damping), shape ``(k,)``, decreasing ``|λ|``.
    eigenvectors
        ``G``, shape ``(k, P)``: the matching approximate eigenvectors of ``H`` (rows).
    dual_eigenvectors
        ``G̃``, shape ``(k, P)``; the same tensor as ``eigenvectors`` when ``force_hermitian``.
    inverse_eigenvalues
        ``1 / (λ_j + δ)``, shape ``(k,)``.
    """

    def __init__(
        self,
        model: InfluenceModel,
        train_dataset: tf.data.Dataset,
        subspace_dim: int | None = None,
        force_hermitian: bool = True,
        k_largest_eig_vals: int | None = None,
        damping: "float | str" = "auto",
        seed: int = 0,
        dtype: tf.DType = tf.float32,
        show_progress: bool = True,
        curvature: str = "auto",
    ):
        super().__init__(model, train_dataset, damping)
        dtype = tf.as_dtype(dtype)
        if dtype not in (tf.float32, tf.float64):
            raise TypeError(f"dtype must be tf.float32 or tf.float64, got {dtype.name}.")
        nb_params = model.nb_params
        subspace_dim = min(nb_params, DEFAULT_SUBSPACE_DIM) if subspace_dim is None else subspace_dim
        subspace_dim = _check_positive_int(subspace_dim, "subspace_dim")
        if subspace_dim > nb_params:
            raise ValueError(
                f"subspace_dim={subspace_dim} exceeds the number of watched parameters {nb_params}; "
                f"use at most {nb_params}."
            )
        k = subspace_dim
        if k_largest_eig_vals is not None:
            k = _check_positive_int(k_largest_eig_vals, "k_largest_eig_vals")
        if k > subspace_dim:
            raise ValueError(f"k_largest_eig_vals={k} exceeds subspace_dim={subspace_dim}; keep at most subspace_dim.")
        self.subspace_dim = subspace_dim
        self.k_largest_eig_vals = k
        self.force_hermitian = bool(force_hermitian)
        self.seed = int(seed)
        self.dtype = dtype
        self.hessian_operator = HessianOperator(model, train_dataset, curvature=curvature)
        self.curvature = self.hessian_operator.curvature
        self.damping = resolve_damping(
            self.damping,
            lambda: hutchinson_mean_eigenvalue(self.hessian_operator.matmat, nb_params, model.dtype, seed=seed),
            model,
        )

        start = tf.constant(np.random.default_rng(self.seed).standard_normal(nb_params), dtype=dtype)
        basis, projected = arnoldi_iteration(
            self.hessian_operator.matmat, start, subspace_dim, seed=self.seed, show_progress=show_progress
        )
        eigenvalues, eigenvectors, dual = top_eigenpairs(projected, k, self.force_hermitian)
        noise = float(np.abs(np.triu(projected, 2)).max()) if subspace_dim > 2 else 0.0
        eigenvalues, eigenvectors, dual = self._drop_null_directions(eigenvalues, eigenvectors, dual, noise)
        self.eigenvalues = tf.constant(eigenvalues, dtype=dtype)
        self.inverse_eigenvalues = tf.constant(1.0 / (eigenvalues + self.damping), dtype=dtype)
        self.eigenvectors = tf.matmul(tf.constant(eigenvectors, dtype=dtype), basis, transpose_a=True)
        self.dual_eigenvectors = (
            self.eigenvectors if self.force_hermitian else tf.matmul(tf.constant(dual, dtype=dtype), basis)
        )

    def _drop_null_directions(
        self, eigenvalues: np.ndarray, eigenvectors: np.ndarray, dual: np.ndarray, noise: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        precision = np.finfo(self.model.dtype.as_numpy_dtype).eps
        cutoff = max(10.0 * self.subspace_dim * precision * float(np.abs(eigenvalues).max()), _NOISE_MULTIPLE * noise)
        if self.damping > 0.0:
            cancelled = (eigenvalues < 0) & (np.abs(eigenvalues + self.damping) <= cutoff)
            if np.any(cancelled):
                raise SingularHessianError(
                    f"The negative eigenvalue {float(eigenvalues[cancelled][0]):.3e} of the curvature cancels the damping "
                    f"{self.damping}: H + δI is singular. Change damping, or use curvature='ggn' (positive semi-definite)."
                )
            return eigenvalues, eigenvectors, dual
        kept = np.abs(eigenvalues) > cutoff
        if not kept.any():
            raise SingularHessianError(
                "Every kept eigenvalue of the Hessian is zero: the loss is flat in the watched weights on the "
                "Hessian dataset. Check the model and data, or use damping > 0."
            )
        return eigenvalues[kept], eigenvectors[:, kept], dual[kept]

    def ihvp(self, vectors: tf.Tensor) -> tf.Tensor:
        vectors = self.check_vectors(vectors)
        coordinates = tf.matmul(tf.cast(vectors, self.dtype), self.dual_eigenvectors, transpose_b=True)
        result = tf.matmul(coordinates * self.inverse_eigenvalues, self.eigenvectors)
        return tf.cast(result, vectors.dtype)

    def hvp(self, vectors: tf.Tensor) -> tf.Tensor:
        """The exact ``(H + δI) v`` (one pass over the Hessian dataset), not its rank-k approximation."""
        vectors = self.check_vectors(vectors)
        return self.hessian_operator.matmat(vectors) + self.damping * vectors
