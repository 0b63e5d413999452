"""Each watched layer's per-sample gradient as a sum of outer products ``Σ_t ā_t δ_tᵀ``.

K-FAC and EK-FAC (:mod:`influence_lib.curvature.kfac`) see a watched layer's gradient as a
matrix ``G = Σ_t ā_t δ_tᵀ`` of shape ``(d_a, d_s)``: ``ā_t`` is the layer's input at position
``t`` (with a 1 appended when the bias is watched), ``δ_t`` the gradient of the loss with respect
to the layer's pre-activation output there. This module maps

* a layer's recorded calls (:class:`~influence_lib.model.layer_rules.LayerCall`) to
  ``(ā, δ)`` of shapes ``(B, T, d_a)`` and ``(B, T, d_s)``; and
* a layer's block of a flat gradient vector (the watched weights' order in
  :attr:`InfluenceModel.weights <influence_lib.model.influence_model.InfluenceModel.weights>`) to
  that matrix form and back.

Layer types: Dense (inputs of any rank: the middle axes are positions), Conv1D/Conv2D (patches
of the input, one per output position, Grosse & Martens 2016), Embedding (``ā_t`` is the one-hot
token id: the features are the ids themselves) and EinsumDense whose equation is a matmul over
its last axes (``batch + P + C, C + O -> batch + P + O``). A layer used several times in the
forward pass contributes the positions of all its calls.
"""
import re
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from ..model.influence_model import InfluenceModel
from ..model.layer_rules import ConvRule, DenseRule, EinsumDenseRule, EmbeddingRule, LayerCall

SUPPORTED = (
    "Dense, Conv1D/Conv2D (channels_last, one group), Embedding and EinsumDense whose equation is a matmul "
    "over its last axes (e.g. 'abc,cd->abd')"
)
_EQUATION = re.compile(r"^([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]+)$")


@dataclass(frozen=True)
class KroneckerBlock:
    """One watched layer seen as ``G = Σ_t ā_t δ_tᵀ``.

    Attributes
    ----------
    layer
        The Keras layer.
    kind
        ``'dense'``, ``'conv'``, ``'embedding'`` or ``'einsum'``.
    input_dim, output_dim
        ``d_a`` (kernel rows, plus 1 if the bias is watched) and ``d_s``.
    parts
        The layer's watched weights in flat-vector order: ``('kernel' | 'bias', size)``.
    """

    layer: keras.layers.Layer
    kind: str
    input_dim: int
    output_dim: int
    parts: tuple[tuple[str, int], ...]

    @property
    def size(self) -> int:
        """Number of watched parameters of the layer."""
        return sum(size for _, size in self.parts)

    @property
    def diagonal_input(self) -> bool:
        """Whether ``A`` is diagonal (Embedding: one-hot inputs), stored as its diagonal."""
        return self.kind == "embedding"

    @property
    def kernel_watched(self) -> bool:
        return any(name == "kernel" for name, _ in self.parts)

    @property
    def bias_watched(self) -> bool:
        return any(name == "bias" for name, _ in self.parts)

    def features(self, calls: list[LayerCall]) -> tuple[tf.Tensor, tf.Tensor]:
        """``(ā, δ)`` of one batch: ``(B, T, d_a)`` (Embedding: int64 ids ``(B, T)``) and ``(B, T, d_s)``, in δ's dtype.

        The positions of several calls of the layer are concatenated along ``T``.
        """
        pairs = [self._call_features(call) for call in calls]
        if len(pairs) == 1:
            return pairs[0]
        return tf.concat([a for a, _ in pairs], axis=1), tf.concat([d for _, d in pairs], axis=1)

    def _call_features(self, call: LayerCall) -> tuple[tf.Tensor, tf.Tensor]:
        batch = tf.shape(call.delta)[0]
        if call.delta.shape.rank == 2:
            delta = call.delta[:, None]
        else:
            delta = tf.reshape(call.delta, [batch, -1, self.output_dim])
        if self.kind == "embedding":
            return tf.reshape(tf.cast(call.inputs, tf.int64), [batch, -1]), delta
        if not self.kernel_watched:
            inputs = tf.zeros_like(delta[..., :0])
        elif self.kind == "conv":
            inputs = _conv_patches(self.layer, call)
        else:
            inputs = tf.cast(call.inputs, delta.dtype)
            kernel_rows = self.input_dim - int(self.bias_watched)
            inputs = inputs[:, None] if inputs.shape.rank == 2 else tf.reshape(inputs, [batch, -1, kernel_rows])
        if self.bias_watched:
            inputs = tf.concat([inputs, tf.ones_like(delta[..., :1])], axis=-1)
        return inputs, delta

    def to_matrix(self, block: tf.Tensor) -> tf.Tensor:
        """The layer's block ``(k, P_l)`` of flat vectors as matrices ``(k, d_a, d_s)`` (kernel rows, then bias)."""
        pieces = dict(zip([name for name, _ in self.parts], tf.split(block, [size for _, size in self.parts], axis=1)))
        rows = [pieces[name] for name in ("kernel", "bias") if name in pieces]
        return tf.concat([tf.reshape(piece, [tf.shape(block)[0], -1, self.output_dim]) for piece in rows], axis=1)

    def from_matrix(self, matrix: tf.Tensor) -> tf.Tensor:
        """Inverse of :meth:`to_matrix`: matrices ``(k, d_a, d_s)`` back to the flat block ``(k, P_l)``."""
        count = tf.shape(matrix)[0]
        kernel_rows = self.input_dim - int(self.bias_watched)
        pieces = {}
        if self.kernel_watched:
            pieces["kernel"] = tf.reshape(matrix[:, :kernel_rows], [count, -1])
        if self.bias_watched:
            pieces["bias"] = matrix[:, kernel_rows]
        return tf.concat([pieces[name] for name, _ in self.parts], axis=1)


def _conv_patches(layer: keras.layers.Layer, call: LayerCall) -> tf.Tensor:
    """Input patches ``(B, positions, kernel_positions·c_in)`` matching the kernel flattened row-major.

    Patch row ``(u·k_w + v)·c_in + c`` holds the input channel ``c`` at kernel offset ``(u, v)``,
    as ``kernel.reshape(-1, c_out)`` orders its rows (Grosse & Martens 2016, "A Kronecker-factored
    approximate Fisher matrix for convolution layers").
    """
    inputs, padding = ConvRule._padded(layer, tf.cast(call.inputs, call.delta.dtype))
    kernel_size, strides, dilation = list(layer.kernel_size), list(layer.strides), list(layer.dilation_rate)
    delta = call.delta
    if layer.rank == 1:
        inputs, delta = inputs[:, None], delta[:, None]
        kernel_size, strides, dilation = [1] + kernel_size, [1] + strides, [1] + dilation
    if padding == "SAME":
        inputs = ConvRule._same_padding(inputs, kernel_size, strides, dilation)
    rows, columns = tf.shape(delta)[1], tf.shape(delta)[2]
    shifted = [
        inputs[
            :,
            u * dilation[0] : u * dilation[0] + (rows - 1) * strides[0] + 1 : strides[0],
            v * dilation[1] : v * dilation[1] + (columns - 1) * strides[1] + 1 : strides[1],
        ]
        for u in range(kernel_size[0])
        for v in range(kernel_size[1])
    ]
    patches = tf.stack(shifted, axis=3)
    return tf.reshape(patches, [tf.shape(inputs)[0], -1, len(shifted) * int(layer.kernel.shape[-2])])


def _einsum_matmul_dims(layer: keras.layers.Layer) -> tuple[int, int] | None:
    """``(d_in, d_out)`` when the equation is ``batch+P+C, C+O -> batch+P+O`` (a matmul over the last axes)."""
    match = _EQUATION.match(layer.equation.replace(" ", ""))
    if match is None:
        return None
    inputs, kernel, outputs = match.groups()
    contracted = "".join(letter for letter in kernel if letter in inputs and letter not in outputs)
    produced = "".join(letter for letter in kernel if letter in outputs and letter not in inputs)
    if kernel != contracted + produced or not inputs.endswith(contracted) or not outputs.endswith(produced):
        return None
    if inputs[: len(inputs) - len(contracted)] != outputs[: len(outputs) - len(produced)]:
        return None
    shape = tuple(layer._kernel.shape)
    produced_shape = shape[len(contracted):]
    if layer.bias is not None and tuple(layer.bias.shape) != produced_shape:
        return None
    return int(np.prod(shape[: len(contracted)], dtype=np.int64)), int(np.prod(produced_shape, dtype=np.int64))


def _unsupported(layer: keras.layers.Layer, why: str) -> ValueError:
    return ValueError(
        f"K-FAC / EK-FAC cannot factor the watched layer {layer.name!r} ({type(layer).__name__}): {why}. "
        f"It covers {SUPPORTED}. Watch other layers (start_layer / last_layer) or use ihvp 'cgd' or 'arnoldi'."
    )


def kronecker_blocks(model: InfluenceModel) -> list[KroneckerBlock]:
    """One :class:`KroneckerBlock` per layer of ``model.closed_form_layers``, in flat-vector order.

    Raises
    ------
    ValueError
        If a watched layer is not one of the covered types (the message names it).
    """
    if model._recorder is None:
        layer = model.closed_form_layers[0]
        raise _unsupported(layer, model._static_fallback or "its computation cannot be recorded")
    blocks = []
    for index, layer in enumerate(model.closed_form_layers):
        rule = model._recorder.rules[index]
        positions = model._weight_positions[index]
        parts = tuple(
            ("kernel" if position == 0 else "bias", int(np.prod(weight.shape, dtype=np.int64)))
            for weight, position in zip(model._closed_form_weights[index], positions)
        )
        if isinstance(rule, DenseRule):
            kind, (d_in, d_out) = "dense", tuple(layer._kernel.shape)
        elif isinstance(rule, ConvRule):
            kind = "conv"
            d_in, d_out = int(np.prod(layer.kernel.shape[:-1])), int(layer.kernel.shape[-1])
        elif isinstance(rule, EmbeddingRule):
            kind, (d_in, d_out) = "embedding", tuple(layer._embeddings.shape)
        elif isinstance(rule, EinsumDenseRule):
            dims = _einsum_matmul_dims(layer)
            if dims is None:
                raise _unsupported(layer, f"its equation {layer.equation!r} (with its bias) is not a matmul")
            kind, (d_in, d_out) = "einsum", dims
        else:
            raise _unsupported(layer, "no Kronecker factorization for this layer type")
        bias = any(name == "bias" for name, _ in parts)
        if not any(name == "kernel" for name, _ in parts):
            d_in = 0
        blocks.append(KroneckerBlock(layer, kind, int(d_in) + int(bias), int(d_out), parts))
    return blocks
