"""The interface every inverse-Hessian-vector-product (IHVP) calculator implements.

An IHVP calculator is fit once on a training (Hessian) dataset and then maps vectors ``v`` to
``(H + λI)⁻¹ v`` where ``H`` is the mean Hessian of the training loss over the watched weights
and ``λ ≥ 0`` the damping. Vectors are rows: a batch of ``B`` vectors has shape ``(B, P)``.
"""
from abc import ABC, abstractmethod

import tensorflow as tf

from ..common.datasets import Batch, iterate_batches
from ..common.errors import NonFiniteError
from ..common.streams import GeneratorDataset
from ..model.influence_model import InfluenceModel


def check_damping(damping: "float | str") -> "float | str":
    """Validate a damping coefficient λ ≥ 0, or ``'auto'`` (resolved by each calculator, see
    :mod:`~influence_lib.curvature.spectrum`)."""
    if isinstance(damping, str):
        if damping != "auto":
            raise ValueError(f"damping must be a number ≥ 0 or 'auto', got {damping!r}.")
        return damping
    damping = float(damping)
    if not 0.0 <= damping < float("inf"):
        raise ValueError(f"damping must be a finite number ≥ 0, got {damping}.")
    return damping


class InverseHessianVectorProduct(ABC):
    """Base class of the IHVP calculators (Exact, conjugate gradient, LiSSA, Arnoldi).

    Parameters
    ----------
    model
        The InfluenceModel whose watched weights define the Hessian.
    train_dataset
        Batched dataset of the samples averaged in the Hessian (``None`` when a calculator is
        built from a precomputed Hessian).
    damping
        λ ≥ 0: the calculator inverts ``H + λI``; ``'auto'``: ``λ = max(0.1 · tr(H) / P, λ_train)``, resolved by
        the subclass into a number stored in :attr:`damping`.
    """

    def __init__(self, model: InfluenceModel, train_dataset: tf.data.Dataset | None, damping: "float | str" = 0.0):
        if not isinstance(model, InfluenceModel):
            raise TypeError(f"model must be an InfluenceModel, got {type(model).__name__}.")
        self.model = model
        self.train_set = train_dataset
        self.damping = check_damping(damping)

    @abstractmethod
    def ihvp(self, vectors: tf.Tensor) -> tf.Tensor:
        """``(H + λI)⁻¹ v`` for each row ``v`` of ``vectors`` (shape ``(B, P)``)."""

    @abstractmethod
    def hvp(self, vectors: tf.Tensor) -> tf.Tensor:
        """``(H + λI) v`` for each row ``v`` of ``vectors`` (shape ``(B, P)``)."""

    def check_vectors(self, vectors: tf.Tensor) -> tf.Tensor:
        """Convert to a ``(B, P)`` float tensor; raise a clear error on a shape mismatch or NaN."""
        vectors = tf.convert_to_tensor(vectors, dtype=self.model.dtype)
        if vectors.shape.rank == 1:
            vectors = vectors[None]
        if vectors.shape.rank != 2 or vectors.shape[-1] != self.model.nb_params:
            raise ValueError(
                f"Expected vectors of shape (batch, {self.model.nb_params}) — one entry per watched parameter — "
                f"got shape {tuple(vectors.shape)}."
            )
        finite_rows = tf.reduce_all(tf.math.is_finite(vectors), axis=1)
        if not bool(tf.reduce_all(finite_rows)):
            rows = tf.where(~finite_rows)[:, 0].numpy().tolist()[:10]
            raise NonFiniteError(
                f"The vectors (gradients) passed to the IHVP contain NaN or infinite values at rows {rows} of the "
                "batch: check those samples' inputs and labels."
            )
        return vectors

    def _vectors_of(self, group_batch: Batch, use_gradient: bool) -> tf.Tensor:
        if use_gradient:
            return self.check_vectors(self.model.batch_jacobian_tensor(group_batch))
        return self.check_vectors(tf.reshape(group_batch[0], (-1, self.model.nb_params)))

    def compute_ihvp_single_batch(self, group_batch: Batch, use_gradient: bool = True) -> tf.Tensor:
        """IHVP of one batch, laid out as in Influenciae: shape ``(P, B)``.

        With ``use_gradient=True`` the vectors are the per-sample gradients of the batch's samples;
        otherwise ``group_batch[0]`` holds the vectors themselves.
        """
        return tf.transpose(self.ihvp(self._vectors_of(group_batch, use_gradient)))

    def compute_hvp_single_batch(self, group_batch: Batch, use_gradient: bool = True) -> tf.Tensor:
        """HVP of one batch, laid out as in Influenciae: shape ``(P, B)``."""
        return tf.transpose(self.hvp(self._vectors_of(group_batch, use_gradient)))

    def compute_ihvp(self, group: tf.data.Dataset, use_gradient: bool = True) -> tf.data.Dataset:
        """IHVPs of a batched dataset: a dataset with one ``(P, B)`` tensor per batch."""
        return self._per_batch(group, use_gradient, self.compute_ihvp_single_batch)

    def compute_hvp(self, group: tf.data.Dataset, use_gradient: bool = True) -> tf.data.Dataset:
        """HVPs of a batched dataset: a dataset with one ``(P, B)`` tensor per batch."""
        return self._per_batch(group, use_gradient, self.compute_hvp_single_batch)

    def _per_batch(self, group: tf.data.Dataset, use_gradient: bool, single_batch) -> tf.data.Dataset:
        if use_gradient:
            self.model.check_dataset(group, "group")
        signature = tf.TensorSpec((self.model.nb_params, None), self.model.dtype)
        return GeneratorDataset(
            lambda: (single_batch(batch, use_gradient) for batch in iterate_batches(group, "group")),
            signature,
        )
