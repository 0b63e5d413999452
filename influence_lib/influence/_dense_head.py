"""Split a Keras classifier into a feature extractor and its final Dense layer.

Shared by the methods that work on the last layer only (representer points, weight-space
boundary): the features ``f = Φ(x)`` are the input of that Dense layer, and the head is
``activation(f W + b)``.
"""
from dataclasses import dataclass

import keras
import tensorflow as tf

from ..common.graph_errors import assert_that, label_message


@dataclass
class DenseHead:
    """A model cut at its Dense head.

    Attributes
    ----------
    features
        Keras model ``x ↦ f``, the input of the head layer (shares the user's layers, never modified).
    layer
        The head Dense layer.
    """

    features: keras.Model
    layer: keras.layers.Dense

    @property
    def kernel(self) -> tf.Tensor:
        """The head kernel ``W``, shape ``(d, C)``."""
        return tf.convert_to_tensor(self.layer.kernel)

    @property
    def bias(self) -> tf.Tensor | None:
        """The head bias ``b``, shape ``(C,)``, or None without bias."""
        return tf.convert_to_tensor(self.layer.bias) if self.layer.use_bias else None

    def activation(self, logits: tf.Tensor) -> tf.Tensor:
        """The head's activation applied to its pre-activation outputs ``f W + b``."""
        return self.layer.activation(logits)


def split_dense_head(model: keras.Model, layer: int | str = -1) -> DenseHead:
    """Cut ``model`` before the Dense layer ``layer`` (index or name), which must be its output layer.

    Raises
    ------
    TypeError
        If ``model`` is not a Keras model.
    ValueError
        If the layer does not exist, is not a Dense layer, is not the model's last layer, or the model
        has no symbolic inputs (subclassed models: rebuild them as Functional or Sequential models).
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}.")
    try:
        head = model.get_layer(name=layer) if isinstance(layer, str) else model.layers[layer]
    except (IndexError, ValueError) as error:
        raise ValueError(
            f"Layer {layer!r} does not exist in the model (it has {len(model.layers)} layers)."
        ) from error
    if not isinstance(head, keras.layers.Dense):
        raise ValueError(
            f"Layer {layer!r} ({type(head).__name__} '{head.name}') must be a Dense layer: this method works "
            "on the final Dense (logits) layer of a classifier."
        )
    if head is not model.layers[-1]:
        raise ValueError(
            f"Layer {layer!r} ('{head.name}') must be the model's output layer; layers after it "
            "would be ignored. Pass the index of the final Dense layer (e.g. -1)."
        )
    try:
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        features = keras.Model(inputs=inputs, outputs=head.input)
    except (AttributeError, ValueError, TypeError) as error:
        raise ValueError(
            "Cannot read the input of the head layer: the model has no symbolic inputs (a subclassed or "
            "unbuilt model). Build it as a Functional or Sequential model with keras.Input."
        ) from error
    return DenseHead(features=features, layer=head)


def label_classes(targets: tf.Tensor, nb_classes: int) -> tf.Tensor:
    """Class indices of a batch of labels, one-hot / probability ``(B, C)`` or sparse ``(B,)`` / ``(B, 1)``;
    sparse labels outside ``[0, C)`` (``[0, 2)`` for a one-output binary head) raise a ``ValueError``."""
    targets = tf.convert_to_tensor(targets)
    if targets.shape.rank == 2 and targets.shape[1] == nb_classes and nb_classes > 1:
        return tf.argmax(targets, axis=1, output_type=tf.int32)
    labels = tf.cast(tf.reshape(targets, [-1]), tf.int32)
    classes = max(nb_classes, 2)  # a one-output binary head takes labels 0 and 1
    out_of_range = tf.logical_or(labels < 0, labels >= classes)
    first_bad = tf.gather(labels, tf.argmax(tf.cast(out_of_range, tf.int32), output_type=tf.int32))
    prefix, suffix = label_message("LABEL", classes).split("LABEL")
    assert_that(tf.logical_not(tf.reduce_any(out_of_range)), prefix.strip(), first_bad, suffix.strip())
    return labels
