"""Closed-form per-sample gradients of the layers an InfluenceModel knows.

For a layer ``z = f(a; θ)`` followed by its activation, and the gradient ``δ = ∂L/∂z`` of the
summed loss ``L = Σ_i ℓ_i`` w.r.t. its pre-activation output, the gradient of the loss of
sample ``i`` alone is a function of ``(a_i, δ_i)`` only, because samples do not interact in
inference mode (``δ_i = ∂ℓ_i/∂z_i``):

* Dense ``z = a W + b``: ``∂ℓ_i/∂W = Σ_t a_{i,t} ⊗ δ_{i,t}`` and ``∂ℓ_i/∂b = Σ_t δ_{i,t}`` (the
  sum runs over the extra axes of sequence inputs).
* Conv1D / Conv2D: the same outer product with the input patch seen by each output position
  (convolution as a matrix product, Chellapilla et al. 2006).
* Embedding ``z_t = E[id_t]``: ``∂ℓ_i/∂E = Σ_t e_{id_{i,t}} ⊗ δ_{i,t}`` (a scatter-add of rows).
* BatchNormalization (inference) and LayerNormalization ``z = γ x̂ + β``: ``∂ℓ_i/∂γ = Σ δ_i ⊙ x̂_i``,
  ``∂ℓ_i/∂β = Σ δ_i``; DepthwiseConv2D and SeparableConv2D: the convolution rule per input
  channel (see their classes).
* EinsumDense ``z = einsum(eq, a, W) + b``: ``∂ℓ_i/∂W = einsum(a_i, δ_i)`` with the kernel's
  letters as output, ``∂ℓ_i/∂b`` = ``δ_i`` summed over the bias's broadcast axes.

So one forward and one backward pass of the batch give all per-sample gradients (Goodfellow,
"Efficient per-example gradient computations", 2015; Rochette et al., 2019). Gradient dot
products of Dense layers never form the gradients:
``⟨g_i, g_j⟩ = Σ_{t,s} (a_{i,t}·a_{j,s} + 1_bias)(δ_{i,t}·δ_{j,s})`` (Pruthi et al., "TracIn",
NeurIPS 2020, used by Captum's TracInCPFast).
"""
import abc
import re
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf


@dataclass
class LayerCall:
    """What one call of a watched layer leaves behind: its input and its pre-activation output.

    ``preactivation`` is in the computation dtype (float32, or float64 for a float64 model) and
    watched by the recording tape; the output gradient ``delta`` (same shape and dtype) is filled
    in after the backward pass.
    """

    inputs: tf.Tensor
    preactivation: tf.Tensor
    delta: tf.Tensor | None = None


def _like(tensor: tf.Tensor, reference: tf.Tensor) -> tf.Tensor:
    """``tensor`` in the computation dtype, which the recorded ``reference`` (a δ) carries."""
    return tf.cast(tensor, reference.dtype)


class LayerRule(abc.ABC):
    """How to run one layer type from its parameters and differentiate it per sample."""

    @staticmethod
    @abc.abstractmethod
    def parameters(layer: keras.layers.Layer) -> list:
        """The layer's parameter variables in the order :meth:`per_sample_gradients` returns them
        (``None`` for an absent parameter, e.g. no bias)."""

    @staticmethod
    @abc.abstractmethod
    def supports(layer: keras.layers.Layer) -> bool:
        """Whether this rule reproduces ``layer``'s computation exactly."""

    @abc.abstractmethod
    def preactivation(self, layer: keras.layers.Layer, inputs: tf.Tensor, values: list) -> tf.Tensor:
        """The layer's output before its activation, from ``inputs`` and parameter ``values``."""

    def activate(self, layer: keras.layers.Layer, preactivation: tf.Tensor) -> tf.Tensor:
        """Apply the layer's activation (identity if it has none)."""
        activation = getattr(layer, "activation", None)
        return preactivation if activation is None else activation(preactivation)

    @abc.abstractmethod
    def per_sample_gradients(self, layer: keras.layers.Layer, call: LayerCall) -> list:
        """Per-sample gradients ``(B, *parameter_shape)`` of each parameter, in ``call.delta``'s dtype."""

    def gram(self, layer: keras.layers.Layer, call_a: LayerCall, call_b: LayerCall, watched: list[bool]) -> tf.Tensor:
        """``⟨g_i, g_j⟩`` restricted to the watched parameters, shape ``(A, B)``.

        Default: the explicit product of the per-sample gradients.
        """
        return tf.matmul(
            self.flat_gradients(layer, call_a, watched), self.flat_gradients(layer, call_b, watched), transpose_b=True
        )

    def norm_sq(self, layer: keras.layers.Layer, call: LayerCall, watched: list[bool]) -> tf.Tensor:
        """``‖g_i‖²`` restricted to the watched parameters, shape ``(B,)``."""
        return tf.reduce_sum(tf.square(self.flat_gradients(layer, call, watched)), axis=1)

    def flat_gradients(self, layer: keras.layers.Layer, call: LayerCall, watched: list[bool]) -> tf.Tensor:
        """Per-sample gradients of the watched parameters, each flattened row-major and
        concatenated in the rule's parameter order, shape ``(B, P_layer)``."""
        grads = [g for g, keep in zip(self.per_sample_gradients(layer, call), watched) if keep]
        batch = tf.shape(grads[0])[0]
        return tf.concat([tf.reshape(g, [batch, -1]) for g in grads], axis=1)


def _is_plain(layer: keras.layers.Layer) -> bool:
    """No LoRA adapter, no quantization, no rematerialization: the plain float computation."""
    return (
        not getattr(layer, "lora_enabled", False)
        and getattr(layer, "quantization_mode", None) is None
        and not getattr(layer, "_remat_mode", None)
    )


def _as_sequence(tensor: tf.Tensor) -> tf.Tensor:
    """``(B, ..., d)`` → ``(B, T, d)`` with ``T`` the product of the middle axes."""
    return tf.reshape(tensor, [tf.shape(tensor)[0], -1, tensor.shape[-1]])


class DenseRule(LayerRule):
    """``keras.layers.Dense``, inputs of any rank ≥ 2."""

    @staticmethod
    def parameters(layer):
        return [layer._kernel, layer.bias]

    @staticmethod
    def supports(layer):
        return type(layer) is keras.layers.Dense and _is_plain(layer)

    def preactivation(self, layer, inputs, values):
        kernel, bias = values
        outputs = tf.tensordot(inputs, kernel, axes=[[inputs.shape.rank - 1], [0]])
        return outputs if bias is None else outputs + bias

    def per_sample_gradients(self, layer, call):
        inputs, delta = _like(call.inputs, call.delta), call.delta
        if inputs.shape.rank == 2:
            return [inputs[:, :, None] * delta[:, None, :], delta]
        inputs, delta = _as_sequence(inputs), _as_sequence(delta)
        return [tf.matmul(inputs, delta, transpose_a=True), tf.reduce_sum(delta, axis=1)]

    def flat_gradients(self, layer, call, watched):
        """With kernel and bias watched, ``[a, 1] ⊗ δ`` flattened is ``[vec(∂W), ∂b]`` in one product."""
        if watched != [True, True]:
            return super().flat_gradients(layer, call, watched)
        inputs = _as_sequence(_like(call.inputs, call.delta))
        augmented = tf.concat([inputs, tf.ones_like(inputs[..., :1])], axis=-1)
        products = tf.matmul(augmented, _as_sequence(call.delta), transpose_a=True)
        return tf.reshape(products, [tf.shape(products)[0], -1])

    @staticmethod
    def _factored_is_cheaper(call_a: LayerCall, call_b: LayerCall) -> bool:
        """Whether summing ``(a·a')(δ·δ')`` over step pairs costs less than forming the gradients."""
        steps_a, steps_b = call_a.inputs.shape[1:-1].num_elements(), call_b.inputs.shape[1:-1].num_elements()
        if steps_a is None or steps_b is None:
            return False
        d_in, d_out = int(call_a.inputs.shape[-1]), int(call_a.delta.shape[-1])
        return steps_a * steps_b * (d_in + d_out + 1) <= d_in * d_out

    def gram(self, layer, call_a, call_b, watched):
        if not any(watched) or not self._factored_is_cheaper(call_a, call_b):
            return super().gram(layer, call_a, call_b, watched)
        watch_kernel, watch_bias = watched[0], len(watched) > 1 and watched[1]
        if call_a.inputs.shape.rank == 2 and call_b.inputs.shape.rank == 2:
            inputs_a, inputs_b = _like(call_a.inputs, call_a.delta), _like(call_b.inputs, call_b.delta)
            factor = tf.matmul(inputs_a, inputs_b, transpose_b=True) if watch_kernel else 0.0
            return (factor + (1.0 if watch_bias else 0.0)) * tf.matmul(call_a.delta, call_b.delta, transpose_b=True)
        inputs_a, delta_a = _as_sequence(_like(call_a.inputs, call_a.delta)), _as_sequence(call_a.delta)
        inputs_b, delta_b = _as_sequence(_like(call_b.inputs, call_b.delta)), _as_sequence(call_b.delta)
        delta_products = tf.einsum("ato,bso->abts", delta_a, delta_b)
        factor = tf.zeros_like(delta_products)
        if watch_kernel:
            factor += tf.einsum("ati,bsi->abts", inputs_a, inputs_b)
        if watch_bias:
            factor += 1.0
        return tf.reduce_sum(factor * delta_products, axis=[2, 3])

    def norm_sq(self, layer, call, watched):
        if call.inputs.shape.rank != 2 or not any(watched):
            return super().norm_sq(layer, call, watched)
        factor = tf.reduce_sum(tf.square(_like(call.inputs, call.delta)), axis=1) if watched[0] else 0.0
        if len(watched) > 1 and watched[1]:
            factor += 1.0
        return factor * tf.reduce_sum(tf.square(call.delta), axis=1)


class EinsumDenseRule(LayerRule):
    """``keras.layers.EinsumDense`` with an explicit equation ``X,Y->Z`` whose first letter is the batch."""

    _EQUATION = re.compile(r"^([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]+)$")

    @staticmethod
    def parameters(layer):
        return [layer._kernel, layer.bias]

    @classmethod
    def supports(cls, layer):
        if type(layer) is not keras.layers.EinsumDense or not _is_plain(layer):
            return False
        match = cls._EQUATION.match(layer.equation.replace(" ", ""))
        if match is None:
            return False
        inputs, kernel, outputs = match.groups()
        batch = inputs[0]
        return outputs[0] == batch and batch not in kernel and set(kernel) <= set(inputs) | set(outputs)

    def preactivation(self, layer, inputs, values):
        kernel, bias = values
        outputs = tf.einsum(layer.equation, inputs, kernel)
        return outputs if bias is None else outputs + bias

    def per_sample_gradients(self, layer, call):
        inputs_spec, kernel_spec, outputs_spec = self._EQUATION.match(layer.equation.replace(" ", "")).groups()
        batch = inputs_spec[0]
        kernel_grad = tf.einsum(
            f"{inputs_spec},{outputs_spec}->{batch}{kernel_spec}", _like(call.inputs, call.delta), call.delta
        )
        if layer.bias is None:
            return [kernel_grad, None]
        bias_shape = tuple(layer.bias.shape)
        delta = call.delta
        rank, leading = delta.shape.rank, delta.shape.rank - len(bias_shape)
        summed = list(range(1, leading)) + [
            axis for axis in range(leading, rank) if bias_shape[axis - leading] == 1 and delta.shape[axis] != 1
        ]
        bias_grad = tf.reduce_sum(delta, axis=summed, keepdims=True) if summed else delta
        return [kernel_grad, tf.reshape(bias_grad, (-1,) + bias_shape)]


class ConvRule(LayerRule):
    """``keras.layers.Conv1D`` / ``Conv2D``: channels_last, one group, any strides, dilation, padding."""

    @staticmethod
    def parameters(layer):
        return [layer.kernel, layer.bias]

    @staticmethod
    def supports(layer):
        return (
            type(layer) in (keras.layers.Conv1D, keras.layers.Conv2D)
            and layer.data_format == "channels_last"
            and layer.groups == 1
            and _is_plain(layer)
        )

    @staticmethod
    def _padded(layer, inputs: tf.Tensor) -> tuple[tf.Tensor, str]:
        if layer.padding == "causal":
            left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
            return tf.pad(inputs, [[0, 0], [left, 0], [0, 0]]), "VALID"
        return inputs, layer.padding.upper()

    def preactivation(self, layer, inputs, values):
        kernel, bias = values
        padded, padding = self._padded(layer, inputs)
        outputs = tf.nn.convolution(
            padded, kernel, strides=list(layer.strides), padding=padding, dilations=list(layer.dilation_rate)
        )
        return outputs if bias is None else outputs + bias

    @staticmethod
    def _same_padding(inputs: tf.Tensor, kernel_size, strides, dilation) -> tf.Tensor:
        """Pad the spatial axes as ``padding="same"`` does: output size ``⌈in / stride⌉``, the extra
        row/column (if the total is odd) after."""
        sizes = tf.shape(inputs)[1:-1]
        extent = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
        outputs = -(-sizes // strides)
        total = tf.maximum((outputs - 1) * strides + extent - sizes, 0)
        before = total // 2
        paddings = tf.stack([before, total - before], axis=1)
        return tf.pad(inputs, tf.concat([[[0, 0]], paddings, [[0, 0]]], axis=0))

    def per_sample_gradients(self, layer, call):
        """``∂ℓ_i/∂K[u, v] = Σ_positions x_i[shifted by (u, v)] ⊗ δ_i`` and ``∂ℓ_i/∂b = Σ_positions δ_i``.

        Each kernel offset ``(u, v)`` takes the strided slice of the (padded) input that meets
        ``K[u, v]`` at every output position and multiplies it with ``δ`` in one batched matmul,
        ``(c_in × positions)·(positions × c_out)`` per sample. No patch tensor is formed: several
        times faster on CPU than ``tf.image.extract_patches`` followed by one matmul.
        """
        inputs, padding = self._padded(layer, _like(call.inputs, call.delta))
        kernel_size, strides, dilation = list(layer.kernel_size), list(layer.strides), list(layer.dilation_rate)
        delta = call.delta
        if layer.rank == 1:
            inputs, delta = inputs[:, None], delta[:, None]
            kernel_size, strides, dilation = [1] + kernel_size, [1] + strides, [1] + dilation
        if padding == "SAME":
            inputs = self._same_padding(inputs, kernel_size, strides, dilation)
        batch, rows, columns = tf.shape(delta)[0], tf.shape(delta)[1], tf.shape(delta)[2]
        flat_delta = tf.reshape(delta, [batch, -1, delta.shape[-1]])
        per_offset = []
        for u in range(kernel_size[0]):
            for v in range(kernel_size[1]):
                shifted = inputs[
                    :,
                    u * dilation[0] : u * dilation[0] + (rows - 1) * strides[0] + 1 : strides[0],
                    v * dilation[1] : v * dilation[1] + (columns - 1) * strides[1] + 1 : strides[1],
                ]
                flat_shifted = tf.reshape(shifted, [batch, -1, layer.kernel.shape[-2]])
                per_offset.append(tf.matmul(flat_shifted, flat_delta, transpose_a=True))
        kernel_grad = tf.reshape(tf.stack(per_offset, axis=1), [batch, *layer.kernel.shape])
        return [kernel_grad, tf.reduce_sum(flat_delta, axis=1)]


class EmbeddingRule(LayerRule):
    """``keras.layers.Embedding``: per-sample gradient = scatter-add of ``δ`` rows at the token ids."""

    @staticmethod
    def parameters(layer):
        return [layer._embeddings]

    @staticmethod
    def supports(layer):
        return type(layer) is keras.layers.Embedding and _is_plain(layer)

    @staticmethod
    def _ids(inputs: tf.Tensor) -> tf.Tensor:
        return inputs if inputs.dtype in (tf.int32, tf.int64) else tf.cast(inputs, tf.int32)

    def preactivation(self, layer, inputs, values):
        return tf.cast(tf.gather(values[0], self._ids(inputs)), layer.compute_dtype)

    def per_sample_gradients(self, layer, call):
        vocabulary, dim = layer._embeddings.shape
        ids = tf.reshape(tf.cast(self._ids(call.inputs), tf.int64), [tf.shape(call.inputs)[0], -1])
        delta = tf.reshape(call.delta, [-1, dim])
        rows = tf.reshape(ids + vocabulary * tf.range(tf.shape(ids, out_type=tf.int64)[0])[:, None], [-1])
        grads = tf.math.unsorted_segment_sum(delta, rows, tf.shape(ids, out_type=tf.int64)[0] * vocabulary)
        return [tf.reshape(grads, [-1, vocabulary, dim])]

    def gram(self, layer, call_a, call_b, watched):
        ids_a = tf.reshape(self._ids(call_a.inputs), [tf.shape(call_a.inputs)[0], -1])
        ids_b = tf.reshape(self._ids(call_b.inputs), [tf.shape(call_b.inputs)[0], -1])
        steps = ids_a.shape[1] * ids_b.shape[1] if None not in (ids_a.shape[1], ids_b.shape[1]) else None
        if steps is None or steps > int(np.prod(layer._embeddings.shape)):
            return super().gram(layer, call_a, call_b, watched)
        ids_b = tf.cast(ids_b, ids_a.dtype)
        same_token = tf.cast(tf.equal(ids_a[:, None, :, None], ids_b[None, :, None, :]), call_a.delta.dtype)
        delta_a = tf.reshape(call_a.delta, [tf.shape(ids_a)[0], -1, call_a.delta.shape[-1]])
        delta_b = tf.reshape(call_b.delta, [tf.shape(ids_b)[0], -1, call_b.delta.shape[-1]])
        return tf.reduce_sum(same_token * tf.einsum("ato,bso->abts", delta_a, delta_b), axis=[2, 3])


def _normalization_dtype(inputs: tf.Tensor) -> tf.DType:
    """Keras normalizes in at least float32 (float64 for float64 inputs)."""
    return tf.float64 if inputs.dtype == tf.float64 else tf.float32


def _normalization_axes(layer: keras.layers.Layer, rank: int) -> list[int]:
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return sorted(axis % rank for axis in axes)


def _scale_and_offset_gradients(layer, normalized: tf.Tensor, delta: tf.Tensor, axes: list[int]) -> list:
    """``∂ℓ_i/∂γ = Σ δ_i ⊙ x̂_i`` and ``∂ℓ_i/∂β = Σ δ_i`` over the axes the parameters broadcast along."""
    summed = [axis for axis in range(1, delta.shape.rank) if axis not in axes]
    batch = tf.shape(delta)[0]
    shape = [batch, *[delta.shape[axis] for axis in axes]]

    def reduce(tensor):
        return tf.reshape(tf.reduce_sum(tensor, axis=summed) if summed else tensor, shape)

    gamma = reduce(delta * normalized) if layer.gamma is not None else None
    beta = reduce(delta) if layer.beta is not None else None
    return [gamma, beta]


class BatchNormalizationRule(LayerRule):
    """``keras.layers.BatchNormalization`` in inference mode: ``z = γ x̂ + β``, ``x̂ = (x − μ)/√(σ² + ε)``.

    ``μ, σ²`` are the moving statistics (not watched), so ``x̂`` depends on the sample only and
    ``∂ℓ_i/∂γ = Σ_positions δ_i ⊙ x̂_i``, ``∂ℓ_i/∂β = Σ_positions δ_i`` (Ioffe & Szegedy, 2015).
    """

    @staticmethod
    def parameters(layer):
        return [layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance]

    @staticmethod
    def supports(layer):
        return type(layer) is keras.layers.BatchNormalization and isinstance(layer.axis, int)

    @staticmethod
    def _broadcast(value, rank: int, axis: int):
        shape = [1] * rank
        shape[axis] = -1
        return tf.reshape(value, shape)

    def _normalized(self, layer, inputs: tf.Tensor, mean, variance) -> tf.Tensor:
        rank = inputs.shape.rank
        axis = layer.axis % rank
        mean, variance = self._broadcast(mean, rank, axis), self._broadcast(variance, rank, axis)
        return (inputs - mean) * tf.math.rsqrt(variance + layer.epsilon)

    def preactivation(self, layer, inputs, values):
        dtype = _normalization_dtype(inputs)
        gamma, beta, mean, variance = [None if v is None else tf.cast(v, dtype) for v in values]
        outputs = self._normalized(layer, tf.cast(inputs, dtype), mean, variance)
        rank, axis = inputs.shape.rank, layer.axis % inputs.shape.rank
        if gamma is not None:
            outputs = outputs * self._broadcast(gamma, rank, axis)
        if beta is not None:
            outputs = outputs + self._broadcast(beta, rank, axis)
        return tf.cast(outputs, layer.compute_dtype)

    def per_sample_gradients(self, layer, call):
        mean, variance = _like(layer.moving_mean, call.delta), _like(layer.moving_variance, call.delta)
        normalized = self._normalized(layer, _like(call.inputs, call.delta), mean, variance)
        axes = [layer.axis % call.delta.shape.rank]
        return [*_scale_and_offset_gradients(layer, normalized, call.delta, axes), None, None]


class LayerNormalizationRule(LayerRule):
    """``keras.layers.LayerNormalization``: ``z = γ x̂ + β`` with ``x̂`` normalized per sample over ``axis``.

    ``x̂`` does not depend on ``γ, β``: ``∂ℓ_i/∂γ = Σ δ_i ⊙ x̂_i``, ``∂ℓ_i/∂β = Σ δ_i`` summed over the
    axes outside ``axis`` (Ba, Kiros & Hinton, 2016).
    """

    @staticmethod
    def parameters(layer):
        return [layer.gamma, layer.beta]

    @staticmethod
    def supports(layer):
        return type(layer) is keras.layers.LayerNormalization and not layer.rms_scaling

    @staticmethod
    def _normalized(layer, inputs: tf.Tensor) -> tuple[tf.Tensor, list[int]]:
        axes = _normalization_axes(layer, inputs.shape.rank)
        mean, variance = tf.nn.moments(inputs, axes=axes, keepdims=True)
        return (inputs - mean) * tf.math.rsqrt(variance + layer.epsilon), axes

    @staticmethod
    def _broadcast(value, inputs: tf.Tensor, axes: list[int]):
        shape = [1] * inputs.shape.rank
        for axis in axes:
            shape[axis] = inputs.shape[axis]
        return tf.reshape(value, shape)

    def preactivation(self, layer, inputs, values):
        dtype = _normalization_dtype(inputs)
        gamma, beta = [None if v is None else tf.cast(v, dtype) for v in values]
        inputs = tf.cast(inputs, dtype)
        outputs, axes = self._normalized(layer, inputs)
        if gamma is not None:
            outputs = outputs * self._broadcast(gamma, inputs, axes)
        if beta is not None:
            outputs = outputs + self._broadcast(beta, inputs, axes)
        return tf.cast(outputs, layer.compute_dtype)

    def per_sample_gradients(self, layer, call):
        normalized, axes = self._normalized(layer, _like(call.inputs, call.delta))
        return _scale_and_offset_gradients(layer, normalized, call.delta, axes)


def _depthwise_kernel_gradients(layer, inputs: tf.Tensor, delta: tf.Tensor, kernel_shape) -> tf.Tensor:
    """Per-sample gradient of a depthwise kernel ``(kh, kw, C, M)`` from its input and output gradient.

    ``∂ℓ_i/∂K[u, v, c, m] = Σ_positions x_i[shifted by (u, v), c] · δ_i[c·M + m]``: for each kernel
    offset, the strided input slice it meets times ``δ`` grouped per input channel.
    """
    if layer.padding == "same":
        inputs = ConvRule._same_padding(inputs, list(layer.kernel_size), list(layer.strides), list(layer.dilation_rate))
    strides, dilation = layer.strides, layer.dilation_rate
    channels, multiplier = kernel_shape[-2], kernel_shape[-1]
    rows, columns = tf.shape(delta)[1], tf.shape(delta)[2]
    grouped = tf.reshape(delta, [tf.shape(delta)[0], rows, columns, channels, multiplier])
    per_offset = []
    for u in range(kernel_shape[0]):
        for v in range(kernel_shape[1]):
            shifted = inputs[
                :,
                u * dilation[0] : u * dilation[0] + (rows - 1) * strides[0] + 1 : strides[0],
                v * dilation[1] : v * dilation[1] + (columns - 1) * strides[1] + 1 : strides[1],
            ]
            per_offset.append(tf.einsum("bhwc,bhwcm->bcm", shifted, grouped))
    return tf.reshape(tf.stack(per_offset, axis=1), [-1, *kernel_shape])


def _depthwise(layer, inputs: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    return tf.nn.depthwise_conv2d(
        inputs,
        kernel,
        strides=[1, *layer.strides, 1],
        padding=layer.padding.upper(),
        dilations=list(layer.dilation_rate),
    )


class DepthwiseConvRule(LayerRule):
    """``keras.layers.DepthwiseConv2D`` (channels_last): each input channel has its own ``M`` filters."""

    @staticmethod
    def parameters(layer):
        return [layer.kernel, layer.bias]

    @staticmethod
    def supports(layer):
        return type(layer) is keras.layers.DepthwiseConv2D and layer.data_format == "channels_last" and _is_plain(layer)

    def preactivation(self, layer, inputs, values):
        kernel, bias = values
        outputs = _depthwise(layer, inputs, kernel)
        return outputs if bias is None else outputs + bias

    def per_sample_gradients(self, layer, call):
        inputs = _like(call.inputs, call.delta)
        kernel_grad = _depthwise_kernel_gradients(layer, inputs, call.delta, tuple(layer.kernel.shape))
        return [kernel_grad, tf.reduce_sum(call.delta, axis=[1, 2])]


class SeparableConvRule(LayerRule):
    """``keras.layers.SeparableConv2D`` (channels_last): a depthwise convolution ``h = x ⊛ D`` then a
    pointwise one ``z = h P + b``.

    ``∂ℓ_i/∂P = Σ_positions h_i ⊗ δ_i``, ``∂ℓ_i/∂b = Σ_positions δ_i``, and the depthwise kernel
    gets the depthwise rule with the gradient ``δ_i Pᵀ`` at ``h`` (the pointwise step is linear).
    """

    @staticmethod
    def parameters(layer):
        return [layer.depthwise_kernel, layer.pointwise_kernel, layer.bias]

    @staticmethod
    def supports(layer):
        return type(layer) is keras.layers.SeparableConv2D and layer.data_format == "channels_last" and _is_plain(layer)

    def preactivation(self, layer, inputs, values):
        depthwise, pointwise, bias = values
        outputs = tf.nn.convolution(_depthwise(layer, inputs, depthwise), pointwise, padding="VALID")
        return outputs if bias is None else outputs + bias

    def per_sample_gradients(self, layer, call):
        depthwise, pointwise = _like(layer.depthwise_kernel, call.delta), _like(layer.pointwise_kernel, call.delta)
        inputs, delta = _like(call.inputs, call.delta), call.delta
        hidden = _depthwise(layer, inputs, depthwise)
        pointwise_grad = tf.einsum("bhwc,bhwo->bco", hidden, delta)[:, None, None]
        hidden_delta = tf.einsum("bhwo,co->bhwc", delta, pointwise[0, 0])
        depthwise_grad = _depthwise_kernel_gradients(layer, inputs, hidden_delta, tuple(layer.depthwise_kernel.shape))
        return [depthwise_grad, pointwise_grad, tf.reduce_sum(delta, axis=[1, 2])]


RULES: tuple[LayerRule, ...] = (DenseRule(), ConvRule(), EmbeddingRule(), EinsumDenseRule())
NORMALIZATION_AND_DEPTHWISE_RULES: tuple[LayerRule, ...] = (
    BatchNormalizationRule(),
    LayerNormalizationRule(),
    DepthwiseConvRule(),
    SeparableConvRule(),
)


def rule_for(layer: keras.layers.Layer) -> LayerRule | None:
    """The closed-form rule for ``layer``, or ``None`` if the layer type is not covered."""
    for rule in RULES + NORMALIZATION_AND_DEPTHWISE_RULES:
        if rule.supports(layer):
            return rule
    return None
