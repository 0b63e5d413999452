"""The true Fisher: gradients of the loss at labels sampled from the model's own predictions.

The Fisher information ``F = E_x E_{y ~ p_θ(y|x)}[∇ℓ(x, y) ∇ℓ(x, y)ᵀ]`` equals the Gauss–Newton
Hessian in expectation when the loss is the negative log-likelihood of ``p_θ``; the *empirical*
Fisher uses the dataset's labels instead (Kunstner, Balles & Hennig, "Limitations of the
empirical Fisher approximation for natural gradient descent", NeurIPS 2019). Sampling needs the
likelihood behind the loss, known here for the Keras losses

* ``CategoricalCrossentropy`` / ``SparseCategoricalCrossentropy`` (logits or probabilities):
  ``y ~ Categorical(softmax(z))``;
* ``MeanSquaredError``: ``ℓ = ‖y − f‖²/d`` is the Gaussian NLL with variance ``d/2`` (up to a
  constant), so ``y ~ N(f, d/2·I)``,

on outputs of shape ``(batch, classes)`` (a loss averaged over more axes is not a likelihood).
Draws are stateless: ``seed`` and a step counter fix them, so a fit is reproducible.
"""
import keras
import tensorflow as tf

from ..model.influence_model import InfluenceModel
from ..model.measurement import loss_from_logits

FISHERS = ("empirical", "true")
_CATEGORICAL = (keras.losses.CategoricalCrossentropy, keras.losses.SparseCategoricalCrossentropy)


def check_fisher(fisher: str, model: InfluenceModel) -> str:
    """Validate ``fisher`` (``'empirical'`` or ``'true'``); ``'true'`` needs a loss with a known likelihood."""
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}.")
    if fisher == "true" and not isinstance(model.loss_function, (*_CATEGORICAL, keras.losses.MeanSquaredError)):
        raise ValueError(
            "fisher='true' samples labels from the model's predictive distribution, known for the Keras losses "
            "CategoricalCrossentropy, SparseCategoricalCrossentropy and MeanSquaredError; the model's loss is "
            f"{type(model.loss_function).__name__}. Use fisher='empirical'."
        )
    return fisher


def sample_targets(loss_function, targets: tf.Tensor, outputs: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Targets drawn from the predictive distribution behind ``loss_function``, shaped like ``targets``.

    Parameters
    ----------
    loss_function
        One of the losses listed in the module docstring.
    targets
        The dataset's targets (only their shape and dtype are used).
    outputs
        The model's outputs ``(batch, classes)``; not differentiated through.
    seed
        Stateless seed, shape ``(2,)``.
    """
    if outputs.shape.rank != 2:
        raise ValueError(
            f"fisher='true' needs model outputs of shape (batch, classes), got rank {outputs.shape.rank}: "
            "a loss averaged over more axes is not a likelihood. Use fisher='empirical'."
        )
    outputs = tf.stop_gradient(tf.cast(outputs, tf.float32))
    if isinstance(loss_function, keras.losses.MeanSquaredError):
        scale = tf.sqrt(tf.cast(tf.shape(outputs)[-1], tf.float32) / 2.0)
        noise = tf.random.stateless_normal(tf.shape(outputs), seed=seed)
        return tf.cast(outputs + scale * noise, targets.dtype)
    logits = outputs if loss_from_logits(loss_function) else tf.math.log(tf.maximum(outputs, 1e-30))
    labels = tf.random.stateless_categorical(logits, 1, seed=seed)[:, 0]
    if isinstance(loss_function, keras.losses.SparseCategoricalCrossentropy):
        return tf.cast(tf.reshape(labels, tf.shape(targets)), targets.dtype)
    return tf.one_hot(labels, outputs.shape[-1], dtype=targets.dtype)


def true_fisher_model(model: InfluenceModel, seed: int, step: tf.Variable) -> InfluenceModel:
    """A view of ``model`` whose per-sample loss is taken at sampled targets.

    Each batch uses the stateless seed ``(seed, step)``; the caller advances ``step`` between batches.
    """
    loss_function = model.loss_function

    def loss_at_sampled_targets(outputs: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
        sampled = sample_targets(loss_function, targets, outputs, tf.stack([tf.constant(seed, tf.int64), step]))
        return loss_function(sampled, outputs)

    return model.with_measurement(loss_at_sampled_targets)
