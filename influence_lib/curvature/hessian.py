"""The mean Hessian of the training loss as a matrix-free linear operator.

.. math::  H = \\frac{1}{n} \\sum_{i=1}^{n} w_i \\nabla^2_\\theta \\ell(z_i; \\theta)

over the watched weights θ and a dataset of n samples (``w_i`` are sample weights, 1 by default).
Products ``H V`` are computed batch by batch from Hessian-vector products of the summed loss,
so memory is bounded by one batch times the number of vectors; per-sample Hessians never exist.
"""
import numpy as np
import tensorflow as tf

from ..common.datasets import batch_size_of, iterate_batches
from ..common.errors import NonFiniteError
from ..common.progress import known_cardinality, progress
from ..model.influence_model import InfluenceModel


class HessianOperator:
    """``V ↦ H V`` for the mean Hessian ``H`` of ``model``'s loss over ``dataset``.

    Parameters
    ----------
    model
        The InfluenceModel whose watched weights define the Hessian.
    dataset
        Batched dataset of the samples averaged in the Hessian.
    show_progress
        Show a progress bar on each pass over ``dataset``.
    """

    def __init__(self, model: InfluenceModel, dataset: tf.data.Dataset, show_progress: bool = False):
        model.check_dataset(dataset, "the Hessian dataset")
        self.model = model
        self.dataset = dataset
        self.show_progress = show_progress

    @property
    def dim(self) -> int:
        """Number of rows (and columns) of H: the number of watched parameters."""
        return self.model.nb_params

    def matmat(self, vectors: tf.Tensor) -> tf.Tensor:
        """``H`` applied to each row of ``vectors`` (shape ``(k, P)``); returns shape ``(k, P)``."""
        total = None
        count = 0
        batches = progress(
            iterate_batches(self.dataset, "the Hessian dataset"),
            self.show_progress,
            "Hessian-vector products",
            known_cardinality(self.dataset),
        )
        for batch in batches:
            product = self.model.batch_hvp_tensor(batch, vectors)
            total = product if total is None else total + product
            count += batch_size_of(batch)
        return total / tf.cast(count, total.dtype)

    def dense(self, chunk_size: int = 512) -> tf.Tensor:
        """The matrix ``H`` itself, shape ``(P, P)``, in one pass over the dataset.

        Each batch is multiplied by blocks of ``chunk_size`` identity rows, so memory is O(P²) for
        the result plus one batch times ``chunk_size`` vectors.
        """
        dim = self.dim
        dtype = self.model.weights[0].dtype
        blocks = [tf.one_hot(tf.range(start, min(start + chunk_size, dim)), dim, dtype=dtype)
                  for start in range(0, dim, chunk_size)]
        total = np.zeros((dim, dim), dtype=dtype.as_numpy_dtype)
        count = 0
        batches = progress(
            iterate_batches(self.dataset, "the Hessian dataset"),
            self.show_progress,
            "Hessian",
            known_cardinality(self.dataset),
        )
        for batch in batches:
            row = 0
            for block in blocks:
                rows = int(block.shape[0])
                total[row : row + rows] += self.model.batch_hvp_tensor(batch, block).numpy()
                row += rows
            count += batch_size_of(batch)
        hessian = total / count
        hessian = tf.constant(0.5 * (hessian + hessian.T))
        if not bool(tf.reduce_all(tf.math.is_finite(hessian))):
            raise NonFiniteError("The Hessian has NaN or infinite entries: check the model's loss on the data.")
        return hessian
