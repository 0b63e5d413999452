"""Hessian-vector products by forward-over-backward automatic differentiation.

For the mean training loss ``L(θ) = (1/n) Σ_i w_i ℓ(z_i; θ)``, ``H v`` is the directional
derivative of the gradient along ``v``:

.. math::  H v = \\frac{d}{d\\epsilon}\\, \\nabla_\\theta L(\\theta + \\epsilon v)\\Big|_{\\epsilon = 0}

computed by pushing the tangent ``v`` forward (``tf.autodiff.ForwardAccumulator``) through the
reverse-mode computation of ``∇L``. It costs about one gradient evaluation per vector and keeps no
second reverse tape, so its memory is that of a gradient (Pearlmutter, "Fast exact multiplication
by the Hessian", Neural Computation 1994; the forward-over-reverse mode of Griewank & Walther,
"Evaluating Derivatives", 2008). The vectors of a call are vectorized together (``pfor``), and
every batch contributes the product of its summed loss: per-sample Hessians never exist.

:class:`HessianOperator` computes the same products reverse-over-reverse
(:meth:`InfluenceModel.batch_hvp_tensor`); both expose ``matmat`` and are interchangeable.
"""
import tensorflow as tf

from ..common.compiled import compiled_method
from ..common.datasets import Batch, batch_size_of, iterate_batches
from ..common.progress import known_cardinality, progress
from ..model.influence_model import InfluenceModel


class ForwardOverBackwardHVP:
    """``v ↦ H v`` for the mean Hessian ``H`` of ``model``'s loss over ``train_dataset`` (Influenciae's
    ``ForwardOverBackwardHVP``).

    Parameters
    ----------
    model
        The InfluenceModel whose watched weights define the Hessian.
    train_dataset
        Batched dataset of the samples averaged in the Hessian.
    weights
        Influenciae's argument: ``None`` or the model's watched weights themselves. To watch other
        weights, build the InfluenceModel with ``weights_to_watch=``.
    show_progress
        Show a progress bar on each pass over the dataset.
    """

    def __init__(
        self,
        model: InfluenceModel,
        train_dataset: tf.data.Dataset,
        weights: list | None = None,
        show_progress: bool = False,
    ):
        if not isinstance(model, InfluenceModel):
            raise TypeError(f"model must be an InfluenceModel, got {type(model).__name__}.")
        if weights is not None and [id(w) for w in weights] != [id(w) for w in model.weights]:
            raise ValueError(
                "weights must be None or the InfluenceModel's own watched weights; to watch other weights build "
                "the model with InfluenceModel(keras_model, weights_to_watch=[...])."
            )
        model.check_dataset(train_dataset, "train_dataset")
        self.model = model
        self.train_dataset = train_dataset
        self.show_progress = show_progress

    @property
    def dim(self) -> int:
        """Number of rows (and columns) of H: the number of watched parameters."""
        return self.model.nb_params

    @compiled_method
    def batch_hvp(self, batch: Batch, vectors: tf.Tensor) -> tf.Tensor:
        """``(Σ_{i ∈ batch} ∇²ℓ_i) v`` for each row ``v`` of ``vectors`` (shape ``(k, P)``)."""

        def product(vector: tf.Tensor) -> tf.Tensor:
            with tf.autodiff.ForwardAccumulator(self.model.tf_variables, self.model.unflatten(vector)) as forward:
                gradient = self.model.summed_gradient(batch)
            return forward.jvp(gradient, unconnected_gradients=tf.UnconnectedGradients.ZERO)

        return tf.vectorized_map(product, tf.cast(vectors, self.model.dtype))

    def matmat(self, vectors: tf.Tensor) -> tf.Tensor:
        """``H`` applied to each row of ``vectors`` (shape ``(k, P)``); returns shape ``(k, P)``."""
        vectors = tf.convert_to_tensor(vectors, self.model.dtype)
        if vectors.shape.rank != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"Expected vectors of shape (k, {self.dim}), got {tuple(vectors.shape)}.")
        total, count = tf.zeros_like(vectors), 0
        batches = progress(
            iterate_batches(self.train_dataset, "train_dataset"),
            self.show_progress,
            "Forward-over-backward HVP",
            known_cardinality(self.train_dataset),
        )
        for batch in batches:
            total += self.batch_hvp(batch, vectors)
            count += batch_size_of(batch)
        return total / tf.cast(count, total.dtype)

    def __call__(self, x_initial: tf.Tensor) -> tf.Tensor:
        """Influenciae's layout: ``H x`` for a vector ``(P,)`` or columns ``(P, k)``; returns ``(P, k)``."""
        columns = tf.convert_to_tensor(x_initial, self.model.dtype)
        columns = tf.reshape(columns, [self.dim, -1])
        return tf.transpose(self.matmat(tf.transpose(columns)))
