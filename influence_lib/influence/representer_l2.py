"""Representer Point Selection with an L2-regularized last layer (Yeh, Kim, Yen & Ravikumar,
"Representer Point Selection for Explaining Deep Neural Networks", NeurIPS 2018).

With ``f_i = Φ(x_i)`` the input of the final Dense layer (the features) and ``y_i`` the trained
model's outputs on the training set, a surrogate last layer ``W*`` (no bias) is fitted to

.. math::  J(W) = \\frac{1}{n}\\sum_{i=1}^n \\ell\\big(y_i, \\sigma(f_i W)\\big) + \\lambda \\|W\\|_F^2

(``σ`` the activation of the original layer, ``ℓ`` the given loss). At its stationary point
``∇J(W*) = 0`` the representer theorem holds exactly:

.. math::  W^* = \\sum_i f_i^\\top \\alpha_i,\\qquad
           \\alpha_i = -\\frac{1}{2\\lambda n}\\,\\frac{\\partial \\ell(y_i, \\sigma(z))}{\\partial z}\\Big|_{z = f_i W^*},
           \\qquad f_t W^* = \\sum_i \\alpha_i \\langle f_i, f_t \\rangle

so the surrogate's logit of class ``c`` on a sample ``t`` decomposes over the training samples;
the influence of training sample ``i`` on ``t`` is ``α_i[c] ⟨f_i, f_t⟩`` with ``c`` the class the
original model predicts for ``t`` (the prediction being explained, as in Yeh et al. and
Influenciae). The self-influence of a training sample is ``α̃_i[y_i] ‖f_i‖²`` where ``α̃_i`` is the
representer value taken against the sample's own **training label** ``y_i`` rather than against
the model output the surrogate was fitted to (which says nothing about the label):
``α̃_i = −1/(2λn) ∂ℓ(e_{y_i}, σ(z))/∂z`` at ``z = f_i W*`` — for cross-entropy
``(1 − σ(f_i W*)[y_i]) / (2λn)``: how strongly the training label disagrees with the regularized
layer, large for mislabeled samples (Yeh et al. §4.2 use representer values to find them; as in
Influenciae, whose ``α`` is also taken against the training labels).

Differences with Influenciae (deliberate): the L2 term is part of the fitted objective (Influenciae
fits an unregularized MSE to the logits, so its ``α`` does not satisfy the theorem) and ``α_i`` is
not divided by the features.

Logits: the targets are the model's output *distributions*. With a loss on probabilities
(``from_logits=False``) the last layer must apply softmax/sigmoid and its outputs are the targets;
with ``from_logits=True`` the last layer must output logits and the targets are their softmax
(categorical losses) or sigmoid (binary losses), while the surrogate's logits ``f W`` go to the loss
as logits. The two mismatched combinations, and a sparse loss (which cannot take distributions as
targets), are rejected. A binary classifier with one output explains its predicted class: the
sign of its single logit's representer values follows the predicted (or, for self-influence, the
labelled) class.

Fitting: deterministic full-batch Newton's method on the strongly convex ``J`` — each Newton
direction solved by conjugate gradients on exact Hessian-vector products, the step chosen by an
Armijo backtracking line search whose step shrinks by ``scaling_factor``. The features and model
outputs of the training set are held in memory (``n × (d + C)`` floats) during the fit. A
float64 model is fit and explained in float64, any other in float32.
"""
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from ..common.compiled import compiled_function
from ..common.datasets import Batch, check_dataset, iterate_batches
from ..common.distribute import check_strategy, data_parallel
from ..common.progress import progress
from ..model.influence_model import loss_in_dtype
from ..model.losses import check_unreduced as _check_unreduced
from ..model.measurement import loss_from_logits
from ..utils.line_search import BacktrackingLineSearch
from ._dense_head import DenseHead, label_classes, split_dense_head
from .base import BaseInfluenceCalculator, result_dtype

_ARMIJO_FRACTION = 1e-4
_MAX_BACKTRACKS = 40


def check_positive(value: float, name: str) -> float:
    """Return ``value`` as a float if it is a positive finite number, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__}.")
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
    return float(value)


_BINARY_LOSSES = (keras.losses.BinaryCrossentropy, keras.losses.BinaryFocalCrossentropy)


def surrogate_targets(loss_function: Callable, head: DenseHead) -> Callable[[tf.Tensor], tf.Tensor]:
    """How the model's outputs become the surrogate's targets: themselves (probabilities or any
    non cross-entropy loss), or the softmax / sigmoid of logits for a ``from_logits=True`` loss.

    Raises
    ------
    ValueError
        For a sparse cross-entropy, or when ``from_logits`` contradicts the last layer's activation.
    """
    if isinstance(loss_function, keras.losses.SparseCategoricalCrossentropy):
        raise ValueError(
            "RPS-L2 fits the surrogate to the model's output distributions, which a sparse loss cannot take as "
            "targets: use keras.losses.CategoricalCrossentropy(reduction=None) (with the same from_logits)."
        )
    from_logits = loss_from_logits(loss_function)
    if from_logits is None:
        return lambda outputs: outputs
    outputs_logits = head.layer.activation is keras.activations.linear
    activation = getattr(head.layer.activation, "__name__", head.layer.activation)
    if from_logits and not outputs_logits:
        raise ValueError(
            f"The loss has from_logits=True but the last layer {head.layer.name!r} applies {activation!r}: its "
            "outputs are not logits. Pass the loss with from_logits=False."
        )
    if not from_logits and outputs_logits:
        raise ValueError(
            f"The last layer {head.layer.name!r} has no activation (it outputs logits) but the loss has "
            "from_logits=False. Pass the loss with from_logits=True."
        )
    if not from_logits:
        return lambda outputs: outputs
    if isinstance(loss_function, _BINARY_LOSSES):
        return tf.math.sigmoid
    return tf.nn.softmax


def _conjugate_gradient(hvp: Callable[[tf.Tensor], tf.Tensor], rhs: tf.Tensor, iterations: int) -> tf.Tensor:
    """Solve ``A x = rhs`` (A symmetric positive definite, given by ``hvp``) with plain CG, in graph."""
    target = 1e-12 * tf.reduce_sum(rhs * rhs)

    def keep_going(step, solution, residual, direction, residual_sq):
        return tf.logical_and(step < iterations, residual_sq > target)

    def iterate(step, solution, residual, direction, residual_sq):
        product = hvp(direction)
        size = residual_sq / tf.reduce_sum(direction * product)
        solution = solution + size * direction
        residual = residual - size * product
        new_residual_sq = tf.reduce_sum(residual * residual)
        direction = residual + (new_residual_sq / residual_sq) * direction
        return step + 1, solution, residual, direction, new_residual_sq

    start = (tf.constant(0), tf.zeros_like(rhs), rhs, rhs, tf.reduce_sum(rhs * rhs))
    return tf.while_loop(keep_going, iterate, start)[1]


class RepresenterPointL2(BaseInfluenceCalculator):
    """Representer points of an L2-regularized surrogate of the last layer (Yeh et al. 2018).

    Parameters
    ----------
    model
        A trained Keras classifier (Functional or Sequential) whose output layer is Dense.
    train_set
        Batched training set ``(x, y[, sample_weight])`` in a fixed order; ``y`` are labels (one-hot or
        sparse), used for the self-influence class.
    loss_function
        Unreduced loss ``ℓ(y_model, σ(f W))`` of the surrogate, comparing the model's outputs (as
        targets) with the surrogate's: e.g. ``CategoricalCrossentropy(reduction=None)`` for a softmax
        model (Yeh et al.'s soft-label cross-entropy).
    lambda_regularization
        ``λ > 0``, weight of ``‖W‖²`` in the fitted objective.
    scaling_factor
        Backtracking factor in (0, 1) of the Armijo line search of the Newton iterations.
    epochs
        Maximum number of Newton iterations (each a full pass over the features; usually < 20 needed).
    layer_index
        Index or name of the final Dense layer (the model's output layer).
    show_progress
        Show progress bars.
    strategy
        ``tf.distribute`` strategy to run on (data-parallel over its replicas); ``None`` uses the
        strategy in scope (see the "Scaling out" page of the documentation).

    Attributes
    ----------
    kernel
        The fitted surrogate kernel ``W*``, shape ``(d, C)``.
    fit_gradient_norm
        ``‖∇J(W*)‖`` at the end of the fit: the representer decomposition is exact up to
        ``fit_gradient_norm / (2λ)`` in ``W``.
    fit_iterations
        Number of Newton iterations the fit took (it stops once ``‖∇J‖ ≤ 1e-6``, or once neither
        the objective nor ``‖∇J‖`` decreases any more at the computation's float precision).
    n_train
        Number of training samples ``n``.
    """

    def __init__(
        self,
        model: keras.Model,
        train_set: tf.data.Dataset,
        loss_function: Callable,
        lambda_regularization: float,
        scaling_factor: float = 0.1,
        epochs: int = 100,
        layer_index: int | str = -1,
        show_progress: bool = True,
        strategy: "tf.distribute.Strategy | None" = None,
    ):
        self.strategy = check_strategy(strategy)
        self.head: DenseHead = split_dense_head(model, layer_index)
        check_dataset(train_set, "train_set")
        _check_unreduced(loss_function)
        self.lambda_regularization = check_positive(lambda_regularization, "lambda_regularization")
        if not 0 < scaling_factor < 1:
            raise ValueError(f"scaling_factor must be in (0, 1), got {scaling_factor!r}.")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}.")
        self.model = model
        self.train_set = train_set
        self.loss_function = loss_function
        self.dtype = result_dtype(model)
        self._loss = loss_in_dtype(loss_function, self.dtype)
        self._targets_of = surrogate_targets(loss_function, self.head)
        self.scaling_factor = float(scaling_factor)
        self.epochs = epochs
        self.show_progress = show_progress
        self.nb_classes = int(self.head.layer.units)
        features, targets = self._features_and_targets(train_set)
        self.n_train = int(features.shape[0])
        self.kernel, self.fit_gradient_norm = self._fit(features, targets)

    def _features_and_targets(self, dataset: tf.data.Dataset) -> tuple[tf.Tensor, tf.Tensor]:
        features, targets = [], []
        parallel = data_parallel(self.strategy)
        for batch in iterate_batches(dataset, "train_set"):
            batch_features, batch_targets = parallel.map_rows(lambda shard: self._features_and_outputs(shard[0]), batch)
            features.append(batch_features)
            targets.append(batch_targets)
        return tf.concat(features, axis=0), tf.concat(targets, axis=0)

    @compiled_function
    def _features_and_outputs(self, inputs) -> tuple[tf.Tensor, tf.Tensor]:
        """Features ``(B, d)`` and surrogate targets ``(B, C)`` (the model's output distributions)."""
        features = tf.cast(self.head.features(inputs, training=False), self.dtype)
        outputs = self._targets_of(tf.cast(self.model(inputs, training=False), self.dtype))
        return features, outputs

    def _losses(self, targets: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
        losses = tf.cast(self._loss(targets, self.head.activation(logits)), self.dtype)
        if losses.shape.rank > 1:
            losses = tf.reduce_mean(losses, axis=list(range(1, losses.shape.rank)))
        return losses

    def _fit(self, features: tf.Tensor, targets: tf.Tensor) -> tuple[tf.Tensor, float]:
        lam = self.lambda_regularization
        cg_iterations = int(min(features.shape[1] * self.nb_classes, 200))

        @compiled_function
        def objective(kernel):
            return tf.reduce_mean(self._losses(targets, features @ kernel)) + lam * tf.reduce_sum(kernel * kernel)

        @compiled_function
        def value_and_gradient(kernel):
            with tf.GradientTape() as tape:
                tape.watch(kernel)
                value = objective(kernel)
            return value, tape.gradient(value, kernel)

        @compiled_function
        def newton_direction(kernel, gradient):
            def hvp(direction):
                with tf.GradientTape() as outer:
                    outer.watch(kernel)
                    with tf.GradientTape() as inner:
                        inner.watch(kernel)
                        value = objective(kernel)
                    projection = tf.reduce_sum(inner.gradient(value, kernel) * direction)
                return outer.gradient(projection, kernel)

            return _conjugate_gradient(hvp, -gradient, cg_iterations)

        kernel = tf.zeros([features.shape[1], self.nb_classes], self.dtype)
        line_search = BacktrackingLineSearch(self.scaling_factor, _ARMIJO_FRACTION, 1.0, _MAX_BACKTRACKS)
        self.fit_iterations = 0
        value, gradient = value_and_gradient(kernel)
        for _ in progress(range(self.epochs), self.show_progress, "Fitting the L2 surrogate"):
            direction = newton_direction(kernel, gradient)
            slope = float(tf.reduce_sum(gradient * direction))
            if not slope < 0:
                break
            step = line_search.search(objective, kernel, direction, float(value), slope)
            if step is not None and step.value < float(value):
                kernel = step.point
                value, gradient = value_and_gradient(kernel)
            else:
                # The objective no longer decreases at this float precision: take the Newton step
                # only while it still shrinks the gradient (the representer theorem needs ∇J = 0).
                candidate = kernel + direction
                candidate_value, candidate_gradient = value_and_gradient(candidate)
                if not float(tf.norm(candidate_gradient)) < float(tf.norm(gradient)):
                    break
                kernel, value, gradient = candidate, candidate_value, candidate_gradient
            self.fit_iterations += 1
            if float(tf.norm(gradient)) <= 1e-6:
                break
        return kernel, float(tf.norm(gradient))

    def _representer_values(self, features: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
        """``α = −1/(2λn) ∂ℓ(targets, σ(z))/∂z`` at ``z = f W*``, shape ``(B, C)``."""
        logits = features @ self.kernel
        with tf.GradientTape() as tape:
            tape.watch(logits)
            total = tf.reduce_sum(self._losses(targets, logits))
        return -tape.gradient(total, logits) / (2.0 * self.lambda_regularization * self.n_train)

    @compiled_function
    def _alpha(self, inputs) -> tuple[tf.Tensor, tf.Tensor]:
        """Features ``(B, d)`` and representer values ``α`` ``(B, C)`` of a batch of training inputs."""
        features, targets = self._features_and_outputs(inputs)
        return features, self._representer_values(features, targets)

    @compiled_function
    def _label_alpha(self, inputs, labels) -> tuple[tf.Tensor, tf.Tensor]:
        """Features and representer values ``α̃`` taken against the training labels (class indices)."""
        features, _ = self._features_and_outputs(inputs)
        if self.nb_classes == 1:
            return features, self._representer_values(features, tf.cast(labels[:, None], self.dtype))
        return features, self._representer_values(features, tf.one_hot(labels, self.nb_classes, dtype=self.dtype))

    def _check_dataset(self, dataset: tf.data.Dataset, name: str) -> None:
        check_dataset(dataset, name)

    def _cache_fingerprint(self) -> dict:
        return {
            **super()._cache_fingerprint(),
            "lambda": self.lambda_regularization,
            "n_train": self.n_train,
            "kernel_checksum": float(tf.reduce_sum(self.kernel)),
        }

    def _compute_influence_vector(self, train_samples: Batch) -> tf.Tensor:
        """``ψ(i) = [f_i, α_i]``, shape ``(B, d + C)``."""
        features, alpha = self._alpha(train_samples[0])
        return tf.concat([features, alpha], axis=1)

    def _preprocess_samples(self, samples: Batch) -> tf.Tensor:
        """``φ(t) = [f_t, e_c]`` with ``c`` the class the model predicts for ``t``, shape ``(B, d + C)``."""
        features, outputs = self._features_and_outputs(samples[0])
        return tf.concat([features, self._class_signs(outputs)], axis=1)

    def _class_signs(self, outputs: tf.Tensor) -> tf.Tensor:
        """``e_c`` for the predicted class ``c``; for one output, ``±1`` for a positive / negative prediction."""
        if self.nb_classes == 1:
            return tf.where(outputs > 0.5, tf.ones_like(outputs), -tf.ones_like(outputs))
        return tf.one_hot(tf.argmax(outputs, axis=1), self.nb_classes, dtype=outputs.dtype)

    def _estimate_influence_value_from_influence_vector(
        self, preproc_test_sample: tf.Tensor, influence_vector: tf.Tensor
    ) -> tf.Tensor:
        """``α_i[c_t] ⟨f_i, f_t⟩`` for every pair, shape ``(test, train)``."""
        dim = preproc_test_sample.shape[1] - self.nb_classes
        kernel_values = tf.matmul(preproc_test_sample[:, :dim], influence_vector[:, :dim], transpose_b=True)
        alphas = tf.matmul(preproc_test_sample[:, dim:], influence_vector[:, dim:], transpose_b=True)
        return kernel_values * alphas

    def _compute_influence_value_from_batch(self, train_samples: Batch) -> tf.Tensor:
        """``α̃_i[y_i] ‖f_i‖²`` with ``α̃`` taken against the training labels."""
        labels = label_classes(train_samples[1], self.nb_classes)
        features, alpha = self._label_alpha(train_samples[0], labels)
        if self.nb_classes == 1:
            own = alpha[:, 0] * tf.cast(2 * labels - 1, alpha.dtype)
        else:
            own = tf.gather(alpha, labels, axis=1, batch_dims=1)
        return own * tf.reduce_sum(features * features, axis=1)

    def predict_with_kernel(self, samples_to_evaluate: Batch | tf.Tensor) -> tf.Tensor:
        """The surrogate's logits rebuilt from the representer decomposition ``Σ_i α_i ⟨f_i, f_t⟩``.

        Parameters
        ----------
        samples_to_evaluate
            A batch ``(x, ...)`` or the inputs ``x`` alone.

        Returns
        -------
        tf.Tensor
            Logits (pre-activation) for every class, shape ``(batch, C)``; equal to ``Φ(x) W*`` up
            to the fit's convergence.
        """
        inputs = samples_to_evaluate[0] if isinstance(samples_to_evaluate, (tuple, list)) else samples_to_evaluate
        test_features, _ = self._features_and_outputs(inputs)
        logits = tf.zeros([tf.shape(test_features)[0], self.nb_classes], self.dtype)
        for batch in iterate_batches(self.train_set, "train_set"):
            features, alpha = self._alpha(batch[0])
            logits += tf.matmul(test_features, features, transpose_b=True) @ alpha
        return logits
