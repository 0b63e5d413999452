"""Generalized Gauss-Newton (GGN) curvature: products ``G v = Jᵀ H_out J v`` through any watched layers.

For the network output ``z = f(x; θ)`` of a sample and its loss ``ℓ(z, y)``,

.. math::  G = \\frac{1}{n} \\sum_i J_i^\\top H_{\\mathrm{out},i} J_i, \\qquad
           J_i = \\frac{\\partial z_i}{\\partial \\theta}, \\quad
           H_{\\mathrm{out},i} = \\frac{\\partial^2 \\ell(z_i, y_i)}{\\partial z_i^2}

drops from the Hessian the term ``Σ_c ∂ℓ/∂z_c ∇²_θ z_c`` (the curvature of the network itself),
which makes ``G`` positive semi-definite whenever the loss is convex in ``z`` (cross-entropy on
logits, mean squared error), and equal to the Hessian when ``z`` is linear in the watched weights
(e.g. the last Dense layer alone). Schraudolph, "Fast curvature matrix-vector products for
second-order gradient descent", Neural Computation 2002; Martens, "New insights and perspectives
on the natural gradient method", JMLR 2020.

The network output ``z`` is the model's output, except when the loss is a cross-entropy on
probabilities produced by a final softmax or sigmoid: then ``z`` are the logits that activation
receives (the loss is convex in them, not in the probabilities). ``H_out`` is computed by
automatic differentiation of the user's loss: for losses known to be convex in ``z`` (Keras'
cross-entropies on logits, mean squared / absolute error, Huber, log-cosh) it is applied to the
tangents by a double-backward pass through the loss alone, never formed; for other losses it is
formed as one ``(C, C)`` block per sample (``C`` = the sample's output size, at most 4,096) and
projected onto the positive semi-definite cone (negative eigenvalues set to zero).

Per batch, for ``k`` vectors at once: one forward pass with forward-mode tangents
(``tf.autodiff.ForwardAccumulator`` vectorized over the vectors) gives ``J v``, and one backward
pass vectorized over the vectors gives ``Jᵀ (H_out J v)``; memory is one batch's activations
times ``k``.
"""
import keras
import numpy as np
import tensorflow as tf

from ..common.compiled import compiled_method
from ..common.datasets import Batch
from ..model.influence_model import InfluenceModel, loss_in_dtype

# Largest per-row output size whose (C, C) loss Hessian is materialized.
MAX_OUTPUT_SIZE = 4096
# Keras losses that act on the last axis independently per position.
_ROW_WISE_LOSSES = (
    keras.losses.CategoricalCrossentropy,
    keras.losses.SparseCategoricalCrossentropy,
    keras.losses.BinaryCrossentropy,
    keras.losses.MeanSquaredError,
    keras.losses.MeanAbsoluteError,
    keras.losses.Huber,
    keras.losses.LogCosh,
)
_PROBABILITY_LOSSES = (
    keras.losses.CategoricalCrossentropy,
    keras.losses.SparseCategoricalCrossentropy,
    keras.losses.BinaryCrossentropy,
)
_LINKS = {"Softmax": keras.activations.softmax, "Sigmoid": keras.activations.sigmoid}


def _from_logits(loss_function) -> bool:
    return bool(getattr(loss_function, "_fn_kwargs", {}).get("from_logits", False))


def ggn_is_default(model: InfluenceModel) -> bool:
    """Whether ``curvature='auto'`` picks the GGN: a single output tensor and a built-in Keras loss.

    A built-in loss depends on the weights only through the model's output; a custom callable may
    not (e.g. an L2 penalty on the weights inside the loss), and the GGN would drop its curvature.
    """
    outputs = getattr(model.model, "outputs", None)
    return bool(outputs) and len(outputs) == 1 and isinstance(model.loss_function, _ROW_WISE_LOSSES)


class GaussNewtonProduct:
    """``V ↦ Σ_i J_iᵀ H_out,i J_i V`` over one batch, for an :class:`InfluenceModel`'s watched weights.

    Parameters
    ----------
    model
        The InfluenceModel; its ``loss_function`` defines ``ℓ`` and its ``weights`` define ``θ``.

    Notes
    -----
    The model must return a single tensor. See the module docstring for how ``z`` and
    ``H_out`` are chosen.
    """

    def __init__(self, model: InfluenceModel):
        self.model = model
        loss = model.loss_function
        self.row_wise = isinstance(loss, _ROW_WISE_LOSSES)
        self.uses_link = isinstance(loss, _PROBABILITY_LOSSES) and not _from_logits(loss)
        self.convex = self.row_wise and not (isinstance(loss, _PROBABILITY_LOSSES) and not _from_logits(loss))

    def _network_output(self, outputs) -> tuple[tf.Tensor, object, bool]:
        """``(z, loss_input_of(z), convex)``: where the GGN splits network and loss."""
        if not tf.is_tensor(outputs):
            raise ValueError(
                "curvature='ggn' needs a model with a single output tensor; this model returns "
                f"{type(outputs).__name__}. Use curvature='hessian'."
            )
        if tf.as_dtype(outputs.dtype) != self.model.dtype:
            outputs = tf.cast(outputs, self.model.dtype)
        op_type = getattr(getattr(outputs, "op", None), "type", None)
        if self.uses_link and op_type in _LINKS and len(outputs.op.inputs) == 1:
            return outputs.op.inputs[0], _LINKS[op_type], self.row_wise
        return outputs, None, self.convex

    def _per_sample_loss(self, targets, outputs, sample_weight) -> tf.Tensor:
        losses = loss_in_dtype(self.model.loss_function, self.model.dtype)(targets, outputs)
        if losses.shape.rank > 1:
            losses = tf.reduce_mean(losses, axis=list(range(1, losses.shape.rank)))
        if sample_weight is not None:
            losses = losses * tf.cast(tf.reshape(sample_weight, [-1]), losses.dtype)
        return losses

    def output_hessian(self, batch: Batch, z: tf.Tensor, link, convex: bool) -> tf.Tensor:
        """Blocks ``∂²(Σ_i ℓ_i)/∂z_r²`` of the summed batch loss per output row ``r``, shape ``(R, C, C)``.

        Rows are the positions of the last axis for Keras' row-wise losses (``R = B·T``), else
        whole samples (``C`` = the sample's output size). Sample weights and the mean over
        positions are included. Non-convex blocks are projected onto the PSD cone.
        """
        _, targets, sample_weight = self.model.process_batch_for_loss_fn(batch)
        z = tf.stop_gradient(z)
        size = z.shape[-1] if self.row_wise else int(np.prod(z.shape[1:]))
        if size is None or size > MAX_OUTPUT_SIZE:
            raise ValueError(
                f"curvature='ggn' materializes a ({size}, {size}) loss Hessian per output row; the limit is "
                f"{MAX_OUTPUT_SIZE}. Use curvature='hessian'."
            )
        rows = tf.reshape(z, [-1, size])
        with tf.GradientTape() as outer:
            outer.watch(rows)
            with tf.GradientTape() as inner:
                inner.watch(rows)
                outputs = tf.reshape(rows, tf.shape(z))
                outputs = outputs if link is None else link(outputs)
                total = tf.reduce_sum(self._per_sample_loss(targets, outputs, sample_weight))
            gradient = inner.gradient(total, rows, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        blocks = outer.batch_jacobian(gradient, rows, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        blocks = 0.5 * (blocks + tf.linalg.matrix_transpose(blocks))
        if convex:
            return blocks
        eigenvalues, eigenvectors = tf.linalg.eigh(blocks)
        return tf.matmul(eigenvectors * tf.maximum(eigenvalues, 0.0)[:, None, :], eigenvectors, transpose_b=True)

    def output_hessian_product(self, batch: Batch, z: tf.Tensor, link, tangents: tf.Tensor) -> tf.Tensor:
        """``H_out`` applied to ``k`` output-space tangents of shape ``(k, *z.shape)`` without forming it.

        One double-backward pass through the loss alone, vectorized over the ``k`` tangents.
        """
        _, targets, sample_weight = self.model.process_batch_for_loss_fn(batch)
        z = tf.stop_gradient(z)
        with tf.GradientTape() as outer:
            outer.watch(z)
            with tf.GradientTape() as inner:
                inner.watch(z)
                outputs = z if link is None else link(z)
                total = tf.reduce_sum(self._per_sample_loss(targets, outputs, sample_weight))
            gradient = inner.gradient(total, z, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            axes = list(range(1, tangents.shape.rank))
            projections = tf.reduce_sum(gradient[None] * tf.stop_gradient(tangents), axis=axes)
        return outer.jacobian(
            projections, z, unconnected_gradients=tf.UnconnectedGradients.ZERO, experimental_use_pfor=True
        )

    def _forward(self, batch: Batch) -> tf.Tensor:
        inputs, _, _ = self.model.process_batch_for_loss_fn(batch)
        return self.model.model(inputs, training=False)

    @compiled_method
    def batch_product(self, batch: Batch, vectors: tf.Tensor) -> tf.Tensor:
        """``Σ_i J_iᵀ H_out,i J_i v`` over the batch for each row ``v`` of ``vectors`` (shape ``(k, P)``)."""
        weights = self.model.tf_variables
        vectors = tf.cast(vectors, self.model.dtype)

        def jvp(vector):
            with tf.autodiff.ForwardAccumulator(weights, self.model.unflatten(vector)) as accumulator:
                z, _, _ = self._network_output(self._forward(batch))
            return accumulator.jvp(z, unconnected_gradients=tf.UnconnectedGradients.ZERO)

        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(weights)
            z, link, convex = self._network_output(self._forward(batch))
            with tape.stop_recording():
                tangents = tf.cast(tf.vectorized_map(jvp, vectors), z.dtype)
                if convex:
                    cotangents = self.output_hessian_product(batch, z, link, tangents)
                else:
                    blocks = self.output_hessian(batch, z, link, convex)
                    size = blocks.shape[-1]
                    rows = tf.reshape(tangents, [tf.shape(vectors)[0], -1, size])
                    cotangents = tf.reshape(tf.einsum("rcd,krd->krc", blocks, rows), tf.shape(tangents))
            axes = list(range(1, tangents.shape.rank))
            projections = tf.reduce_sum(z[None] * tf.stop_gradient(cotangents), axis=axes)
        products = tape.jacobian(
            projections, weights, unconnected_gradients=tf.UnconnectedGradients.ZERO, experimental_use_pfor=True
        )
        return tf.cast(self.model.flatten(products, batch_dims=1), self.model.dtype)
