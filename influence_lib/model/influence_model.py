"""InfluenceModel: a Keras model, the weights an influence method watches, and its per-sample loss.

It provides, for a batch, per-sample losses, per-sample gradients (one vectorized pass, no loop
over samples), the gradient of the summed loss, and Hessian-vector products of the summed loss.
"""
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from ..common.datasets import Batch, check_dataset, iterate_batches
from .layer_selection import select_layers

ProcessBatch = Callable[[Batch], tuple[object, tf.Tensor, tf.Tensor | None]]
_LOW_PRECISION = (tf.float16, tf.bfloat16)


def default_process_batch(batch: Batch) -> tuple[object, tf.Tensor, tf.Tensor | None]:
    """Split a batch ``(inputs, targets)`` or ``(inputs, targets, sample_weight)``."""
    if len(batch) == 2:
        return batch[0], batch[1], None
    if len(batch) == 3:
        return batch[0], batch[1], batch[2]
    raise ValueError(
        f"A batch must be (inputs, targets) or (inputs, targets, sample_weight); got a tuple of {len(batch)}. "
        "For other layouts pass process_batch_for_loss_fn=... returning (inputs, targets, sample_weight)."
    )


def _check_unreduced(loss_function: Callable) -> None:
    reduction = getattr(loss_function, "reduction", None)
    if reduction is not None and str(reduction).lower().split(".")[-1] != "none":
        raise ValueError(
            f"The loss function must return one value per sample, but it has reduction={reduction!r}. "
            "Create it with reduction=None, e.g. keras.losses.CategoricalCrossentropy(reduction=None)."
        )


def _as_tf_variable(weight) -> tf.Variable:
    return weight.value if isinstance(weight, keras.Variable) else weight


class InfluenceModel:
    """A Keras 3 model wrapped for influence computations.

    Parameters
    ----------
    model
        A built Keras model (Sequential, Functional or subclassed).
    start_layer
        Name or index of the first layer whose trainable weights are watched. ``None`` (default)
        watches the last layer that has trainable weights.
    last_layer
        Name or index of the last watched layer (inclusive). ``None`` watches ``start_layer`` alone.
    loss_function
        Loss returning one value per sample: a Keras loss created with ``reduction=None`` or any
        callable ``loss(y_true, y_pred) -> (batch,)``. Per-element losses of higher rank (e.g.
        per time step) are averaged over their non-batch axes. Default: categorical
        cross-entropy on probabilities, as in Influenciae.
    process_batch_for_loss_fn
        Maps a dataset batch to ``(inputs, targets, sample_weight or None)``. The default accepts
        ``(x, y)`` and ``(x, y, sample_weight)``.

    Notes
    -----
    The model is always run in inference mode (``training=False``): dropout is off and
    BatchNormalization uses its moving statistics, so samples never mix within a batch.
    Losses are computed in float32 even for float16/bfloat16 models.
    """

    def __init__(
        self,
        model: keras.Model,
        start_layer: str | int | None = None,
        last_layer: str | int | None = None,
        loss_function: Callable | None = None,
        process_batch_for_loss_fn: ProcessBatch = default_process_batch,
    ):
        if not isinstance(model, keras.Model):
            raise TypeError(f"model must be a Keras 3 keras.Model, got {type(model).__name__}.")
        if loss_function is None:
            loss_function = keras.losses.CategoricalCrossentropy(from_logits=False, reduction=None)
        _check_unreduced(loss_function)
        self.model = model
        self.loss_function = loss_function
        self.process_batch_for_loss_fn = process_batch_for_loss_fn
        self.layers = select_layers(model, start_layer, last_layer)
        watched = [weight for layer in self.layers for weight in layer.trainable_weights]
        if not watched:
            names = [layer.name for layer in self.layers]
            raise ValueError(f"The selected layers {names} have no trainable weights; choose other layers.")
        self.weights: list[tf.Variable] = [_as_tf_variable(weight) for weight in watched]
        self.weight_shapes: list[tuple[int, ...]] = [tuple(weight.shape) for weight in self.weights]
        self.nb_params: int = int(sum(np.prod(shape, dtype=np.int64) for shape in self.weight_shapes))

    def __call__(self, inputs) -> tf.Tensor:
        """Run the wrapped model in inference mode."""
        return self.model(inputs, training=False)

    def check_dataset(self, dataset: tf.data.Dataset, name: str = "dataset") -> None:
        """Raise a clear error if ``dataset`` is not a non-empty batched dataset fitting the model."""
        check_dataset(dataset, name)
        inputs_spec = tf.nest.flatten(dataset.element_spec)[0]
        model_inputs = getattr(self.model, "inputs", None)
        if model_inputs:
            expected_rank = len(model_inputs[0].shape)
            if inputs_spec.shape.rank == expected_rank - 1:
                raise ValueError(
                    f"{name} looks unbatched: its inputs have shape {inputs_spec.shape} but the model expects "
                    f"a batch of shape {tuple(model_inputs[0].shape)}. Call {name}.batch(batch_size) first."
                )

    def flatten(self, tensors: Sequence[tf.Tensor], batch_dims: int = 0) -> tf.Tensor:
        """Concatenate per-weight tensors into flat vectors, keeping ``batch_dims`` leading axes."""
        if batch_dims == 0:
            return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)
        leading = tf.shape(tensors[0])[:batch_dims]
        return tf.concat([tf.reshape(t, tf.concat([leading, [-1]], 0)) for t in tensors], axis=batch_dims)

    def unflatten(self, vector: tf.Tensor) -> list[tf.Tensor]:
        """Split a flat vector of ``nb_params`` entries into tensors shaped like the watched weights."""
        sizes = [int(np.prod(shape, dtype=np.int64)) for shape in self.weight_shapes]
        return [tf.reshape(part, shape) for part, shape in zip(tf.split(vector, sizes), self.weight_shapes)]

    def _per_sample_loss(self, batch: Batch) -> tf.Tensor:
        inputs, targets, sample_weight = self.process_batch_for_loss_fn(batch)
        outputs = self.model(inputs, training=False)
        outputs = tf.nest.map_structure(
            lambda out: tf.cast(out, tf.float32) if out.dtype in _LOW_PRECISION else out, outputs
        )
        losses = self.loss_function(targets, outputs)
        if losses.shape.rank == 0:
            raise ValueError(
                "The loss function returned a single value for the whole batch: it is reduced, or the "
                "dataset is unbatched. Use reduction=None and batch the dataset."
            )
        if losses.shape.rank > 1:
            losses = tf.reduce_mean(losses, axis=list(range(1, losses.shape.rank)))
        if sample_weight is not None:
            losses = losses * tf.cast(tf.reshape(sample_weight, [-1]), losses.dtype)
        return losses

    @tf.function(reduce_retracing=True)
    def batch_loss_tensor(self, batch: Batch) -> tf.Tensor:
        """Per-sample losses of one batch, shape ``(batch,)`` (sample weights applied)."""
        return self._per_sample_loss(batch)

    @tf.function(reduce_retracing=True)
    def batch_jacobian_tensor(self, batch: Batch) -> tf.Tensor:
        """Per-sample gradients of the loss w.r.t. the watched weights, shape ``(batch, nb_params)``.

        One vectorized pass over the batch (``GradientTape.jacobian`` with pfor).
        """
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self.weights)
            losses = self._per_sample_loss(batch)
        jacobians = tape.jacobian(
            losses, self.weights, unconnected_gradients=tf.UnconnectedGradients.ZERO, experimental_use_pfor=True
        )
        return self.flatten(jacobians, batch_dims=1)

    @tf.function(reduce_retracing=True)
    def batch_gradient_dot_tensor(self, batch_a: Batch, batch_b: Batch) -> tf.Tensor:
        """Dot products of per-sample gradients ``⟨g_i, g_j⟩`` between two batches, shape ``(A, B)``."""
        return tf.matmul(self.batch_jacobian_tensor(batch_a), self.batch_jacobian_tensor(batch_b), transpose_b=True)

    @tf.function(reduce_retracing=True)
    def batch_gradient_norm_sq_tensor(self, batch: Batch) -> tf.Tensor:
        """Squared norms of the per-sample gradients ``‖g_i‖²``, shape ``(batch,)``."""
        return tf.reduce_sum(tf.square(self.batch_jacobian_tensor(batch)), axis=1)

    @tf.function(reduce_retracing=True)
    def batch_gradient_tensor(self, batch: Batch) -> tf.Tensor:
        """Gradient of the summed loss of one batch w.r.t. the watched weights, shape ``(nb_params,)``."""
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self.weights)
            loss = tf.reduce_sum(self._per_sample_loss(batch))
        return self.flatten(tape.gradient(loss, self.weights, unconnected_gradients=tf.UnconnectedGradients.ZERO))

    @tf.function(reduce_retracing=True)
    def batch_hvp_tensor(self, batch: Batch, vectors: tf.Tensor) -> tf.Tensor:
        """Hessian of the summed loss of one batch times each row of ``vectors``.

        Computes ``(Σ_i ∇²ℓ_i) v`` for every row ``v`` of ``vectors`` (shape ``(k, nb_params)``) by
        differentiating ``⟨∇ Σ_i ℓ_i, v⟩`` once more; no per-sample Hessian is ever formed.
        """
        with tf.GradientTape(watch_accessed_variables=False) as outer:
            outer.watch(self.weights)
            with tf.GradientTape(watch_accessed_variables=False) as inner:
                inner.watch(self.weights)
                loss = tf.reduce_sum(self._per_sample_loss(batch))
            gradient = self.flatten(
                inner.gradient(loss, self.weights, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            )
            projections = tf.linalg.matvec(tf.cast(vectors, gradient.dtype), gradient)
        hvps = outer.jacobian(
            projections, self.weights, unconnected_gradients=tf.UnconnectedGradients.ZERO, experimental_use_pfor=True
        )
        return self.flatten(hvps, batch_dims=1)

    def batch_loss(self, dataset: tf.data.Dataset) -> tf.Tensor:
        """Per-sample losses of a whole batched dataset, shape ``(n,)``."""
        self.check_dataset(dataset)
        return tf.concat([self.batch_loss_tensor(batch) for batch in iterate_batches(dataset)], axis=0)

    def batch_jacobian(self, dataset: tf.data.Dataset) -> tf.Tensor:
        """Per-sample gradients of a whole batched dataset, shape ``(n, nb_params)`` (held in memory)."""
        self.check_dataset(dataset)
        return tf.concat([self.batch_jacobian_tensor(batch) for batch in iterate_batches(dataset)], axis=0)

    def batch_gradient(self, dataset: tf.data.Dataset) -> tf.Tensor:
        """Gradient of the summed loss of each batch, shape ``(nb_batches, nb_params)``."""
        self.check_dataset(dataset)
        return tf.stack([self.batch_gradient_tensor(batch) for batch in iterate_batches(dataset)])
