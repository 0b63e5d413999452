"""Cross-entropies computed from logits whose gradients stay exact for very confident samples.

TensorFlow's fused ``softmax_cross_entropy_with_logits`` returns the gradient ``p − y``; for a
sample with ``1 − p_y`` below float32's resolution near 1 (about 6e-8) the label entry
``p_y − 1`` rounds to 0 while the other entries ``p_k`` stay representable, so the per-sample
gradient loses its largest-but-one component and its relative error reaches 100 % (issue 18:
136 of 500 MLP test images). Written with the margin ``r_y = logsumexp_{k≠y} z_k − z_y``,

.. math::  -\\log p_y = \\log\\bigl(1 + e^{r_y}\\bigr) = \\operatorname{softplus}(r_y),
           \\qquad \\frac{\\partial}{\\partial z_y} = -\\sigma(r_y) = -(1 - p_y),
           \\qquad \\frac{\\partial}{\\partial z_k} = \\sigma(r_y)\\,\\operatorname{softmax}_{j≠y}(z)_k = p_k,

every entry of the loss and of its gradient is computed without cancellation. Soft targets
``t`` (label smoothing) with mass ``s = Σ_k t_k`` and ``y = argmax t`` use the exact identity
``Σ_k t_k (lse z − z_k) = s·softplus(r_y) + Σ_k (t_k − s·[k = y]) (lse z − z_k)``, whose second
term has the cancellation-free gradient ``−(t − s·e_y)``. The binary cross-entropy is
``t·softplus(−z) + (1 − t)·softplus(z)`` (gradient ``−t σ(−z) + (1 − t) σ(z)``), averaged over
the last axis as Keras does.
"""
import tensorflow as tf


def _excluded_logsumexp(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """``logsumexp_{k≠y} z_k`` per row."""
    is_label = tf.one_hot(labels, logits.shape[-1], on_value=True, off_value=False)
    return tf.reduce_logsumexp(tf.where(is_label, tf.fill(tf.shape(logits), logits.dtype.min), logits), axis=-1)


def _label_cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """``−log softmax(z)_y = softplus(logsumexp_{k≠y} z_k − z_y)``."""
    correct = tf.gather(logits, labels, axis=-1, batch_dims=labels.shape.rank)
    return tf.math.softplus(_excluded_logsumexp(logits, labels) - correct)


class LogitsCrossEntropy:
    """Per-sample cross-entropy from logits, as Keras's cross-entropy with ``from_logits=True``.

    Parameters
    ----------
    kind
        ``'categorical'`` (one-hot or soft targets), ``'sparse'`` (integer labels) or ``'binary'``.
    label_smoothing
        As Keras's: targets ``t(1 − ε) + ε/C`` (categorical) or ``t(1 − ε) + ε/2`` (binary).
    """

    reduction = None

    def __init__(self, kind: str, label_smoothing: float = 0.0):
        if kind not in ("categorical", "sparse", "binary"):
            raise ValueError(f"kind must be 'categorical', 'sparse' or 'binary', got {kind!r}.")
        self.kind = kind
        self.label_smoothing = float(label_smoothing)

    def __call__(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        logits = tf.convert_to_tensor(y_pred)
        if self.kind == "binary":
            targets = tf.cast(y_true, logits.dtype)
            targets = targets * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
            elementwise = targets * tf.math.softplus(-logits) + (1.0 - targets) * tf.math.softplus(logits)
            return tf.reduce_mean(elementwise, axis=-1)
        if self.kind == "sparse":
            labels = tf.cast(tf.reshape(y_true, tf.shape(logits)[:-1]), tf.int32)
            return _label_cross_entropy(logits, labels)
        targets = tf.cast(y_true, logits.dtype)
        classes = logits.shape[-1]
        targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / classes
        labels = tf.argmax(targets, axis=-1, output_type=tf.int32)
        mass = tf.reduce_sum(targets, axis=-1)
        remainder = targets - mass[..., None] * tf.one_hot(labels, classes, dtype=logits.dtype)
        negative_log_softmax = tf.reduce_logsumexp(logits, axis=-1, keepdims=True) - logits
        return mass * _label_cross_entropy(logits, labels) + tf.reduce_sum(remainder * negative_log_softmax, axis=-1)
