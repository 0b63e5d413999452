"""Representer Point Selection via Local Jacobian Expansion (Sui, Wu & Mao, "Representer Point
Selection via Local Jacobian Expansion for Post-hoc Classifier Explanation of Deep Neural Networks
and Ensemble Models", NeurIPS 2021).

The final Dense layer ``Θ*`` (shape ``(d, C)``, no bias) of a trained classifier is first moved
off its optimum by one gradient-ascent step on the summed training loss, ``Θ_0 = Θ* + ε Σ_i ∇ℓ_i(Θ*)``
(Influenciae's choice, with ``ε`` its step size), then expanded back with one Newton step of the
mean training loss ``L``:

.. math::  \\Theta^* \\approx \\Theta_{LJE} = \\Theta_0 - H_0^{-1} \\nabla L(\\Theta_0)
           = \\sum_{i=1}^n \\frac{1}{n}\\big(\\Theta_0 - H_0^{-1} \\nabla_\\Theta \\ell_i(\\Theta_0)\\big)

with ``H_0`` the mean Hessian of the loss w.r.t. ``Θ`` at ``Θ_0`` (from the IHVP factory, over the
training set or ``n_samples_for_hessian`` samples of it) and ``n`` the size of the training set.
The logit of class ``c`` on a sample ``t`` with features ``f_t`` then decomposes over the training
samples, and the influence of training sample ``i`` is its term:

.. math::  I(i, t) = \\frac{1}{n}\\, f_t^\\top \\big(\\Theta_0 - H_0^{-1} \\nabla_\\Theta \\ell_i(\\Theta_0)\\big)_{:, c}

with ``c`` the class the model predicts for ``t``; ``Σ_i I(i, t) = (f_t Θ_LJE)_c`` exactly. The
self-influence of a training sample uses its label class ``c = y_i``.

Differences with Influenciae (deliberate): ``n`` is the training-set size (Influenciae uses the batch
size), and the decomposition is kept exact: Influenciae divides ``Θ_0 − H⁻¹g_i`` element-wise by
``n f_i``, sums it over the features and multiplies by ``⟨f_i, f_t⟩``, which does not reproduce
``f_t Θ_LJE``. Here the influence vector of a training sample is ``ψ(i) = vec(Θ_0 − H_0⁻¹ g_i) / n``
and a sample to evaluate is ``φ(t) = vec(f_t e_cᵀ)`` (``d·C`` entries each).
"""
import keras
import numpy as np
import tensorflow as tf

from ..common.datasets import Batch, batch_size_of, iterate_batches
from ..common.distribute import check_strategy, data_parallel, using_strategy
from ..common.progress import progress, quieted
from ..curvature.factory import InverseHessianVectorProductFactory
from ..model.influence_model import InfluenceModel
from ._dense_head import label_classes, split_dense_head
from .base import BaseInfluenceCalculator
from .first_order import hessian_subset


class RepresenterPointLJE(BaseInfluenceCalculator):
    """Representer points of the local Jacobian expansion of the last layer (Sui et al. 2021).

    Parameters
    ----------
    influence_model
        The trained classifier and its unreduced loss; its model must end with a Dense layer
        without bias (Functional or Sequential model).
    dataset
        Batched training set ``(x, y[, sample_weight])``, in a fixed order.
    ihvp_calculator_factory
        Builds the inverse-Hessian-vector product of the head's mean Hessian, e.g.
        ``ExactIHVPFactory(damping=...)``.
    n_samples_for_hessian
        Average the Hessian over this many training samples (all when None); ``n`` stays the
        size of the whole training set.
    target_layer
        Index or name of the final Dense layer.
    epsilon
        Step size of the gradient-ascent perturbation ``Θ_0 = Θ* + ε Σ_i ∇ℓ_i(Θ*)`` (0: none).
    shuffle_buffer_size, seed
        Drawing of the Hessian subset.
    show_progress
        Show progress bars.
    strategy
        ``tf.distribute`` strategy to run on (data-parallel over its replicas); ``None`` uses the
        strategy in scope (see the "Scaling out" page of the documentation).

    Attributes
    ----------
    perturbed_kernel
        ``Θ_0``, shape ``(d, C)``.
    n_train
        ``n``, the number of training samples.
    ihvp_calculator
        The IHVP calculator of the head's Hessian at ``Θ_0``.
    """

    def __init__(
        self,
        influence_model: InfluenceModel,
        dataset: tf.data.Dataset,
        ihvp_calculator_factory: InverseHessianVectorProductFactory,
        n_samples_for_hessian: int | None = None,
        target_layer: int | str = -1,
        epsilon: float = 1e-5,
        shuffle_buffer_size: int = 10000,
        seed: int = 0,
        show_progress: bool = True,
        strategy: "tf.distribute.Strategy | None" = None,
    ):
        self.strategy = check_strategy(strategy)
        if not isinstance(influence_model, InfluenceModel):
            raise TypeError(f"influence_model must be an InfluenceModel, got {type(influence_model).__name__}.")
        if not isinstance(ihvp_calculator_factory, InverseHessianVectorProductFactory):
            raise TypeError(
                "ihvp_calculator_factory must be an InverseHessianVectorProductFactory such as ExactIHVPFactory(), "
                f"got {type(ihvp_calculator_factory).__name__}."
            )
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (np.isfinite(epsilon) and epsilon >= 0):
            raise ValueError(f"epsilon must be a non-negative finite number, got {epsilon!r}.")
        influence_model.check_dataset(dataset, "dataset")
        self.head = split_dense_head(influence_model.model, target_layer)
        if self.head.layer.use_bias:
            raise ValueError(
                f"The Dense layer '{self.head.layer.name}' has a bias; RPS-LJE decomposes a head without bias "
                "(as in Sui et al. 2021). Rebuild the last layer with use_bias=False."
            )
        self.influence_model = influence_model
        self.show_progress = show_progress
        self.epsilon = float(epsilon)
        in_dim, self.nb_classes = (int(size) for size in self.head.layer.kernel.shape)
        dtype = influence_model.dtype.name
        head_model = keras.Sequential(
            [
                keras.Input((in_dim,), dtype=dtype),
                keras.layers.Dense(
                    self.nb_classes, use_bias=False, activation=self.head.layer.activation, dtype=dtype
                ),
            ]
        )
        head_model.layers[-1].kernel.assign(tf.cast(self.head.kernel, head_model.layers[-1].kernel.dtype))
        self.head_model = InfluenceModel(head_model, loss_function=influence_model.loss_function)

        gradient_sum = tf.zeros([self.head_model.nb_params], self.value_dtype)
        self.n_train = 0
        parallel = data_parallel(self.strategy)
        batches = progress(iterate_batches(dataset, "dataset"), show_progress, "RPS-LJE perturbation")
        for batch in batches:
            gradient = parallel.sum_rows(
                lambda shard: self.head_model.batch_gradient_tensor(self._feature_batch(shard)), batch
            )
            gradient_sum += tf.cast(gradient, self.value_dtype)
            self.n_train += batch_size_of(batch)
        kernel = head_model.layers[-1].kernel
        kernel.assign(kernel + tf.cast(self.epsilon * tf.reshape(gradient_sum, kernel.shape), kernel.dtype))
        self.perturbed_kernel = tf.convert_to_tensor(kernel)

        hessian_set = hessian_subset(dataset, n_samples_for_hessian, shuffle_buffer_size, seed)
        feature_batches = [
            parallel.map_rows(self._feature_batch, batch) for batch in iterate_batches(hessian_set, "dataset")
        ]
        hessian_features = tf.data.Dataset.from_tensor_slices(
            tuple(tf.concat(parts, axis=0) for parts in zip(*feature_batches))
        ).batch(max(batch_size_of(batch) for batch in feature_batches))
        with using_strategy(strategy):
            factory = quieted(ihvp_calculator_factory, show_progress)
            self.ihvp_calculator = factory.build(self.head_model, hessian_features)

    def _feature_batch(self, batch: Batch) -> Batch:
        """``(f, y[, sample_weight])`` for the head from a training batch ``(x, y[, sample_weight])``."""
        inputs, targets, sample_weight = self.influence_model.process_batch_for_loss_fn(batch)
        features = self.head.features(inputs, training=False)
        return (features, targets) if sample_weight is None else (features, targets, sample_weight)

    @property
    def _primary_model(self) -> InfluenceModel:
        return self.influence_model

    def _cache_fingerprint(self) -> dict:
        return {
            **super()._cache_fingerprint(),
            "n_train": self.n_train,
            "epsilon": self.epsilon,
            "ihvp": type(self.ihvp_calculator).__name__,
            "damping": self.ihvp_calculator.damping,
        }

    def _class_features(self, features: tf.Tensor, classes: tf.Tensor) -> tf.Tensor:
        """``vec(f e_cᵀ)`` for each row, in the layout of the flattened kernel, shape ``(B, d·C)``."""
        one_hot = tf.one_hot(classes, self.nb_classes, dtype=features.dtype)
        return tf.reshape(tf.einsum("bd,bc->bdc", features, one_hot), [tf.shape(features)[0], -1])

    def _compute_influence_vector(self, train_samples: Batch) -> tf.Tensor:
        """``ψ(i) = vec(Θ_0 − H_0⁻¹ ∇ℓ_i(Θ_0)) / n``, shape ``(B, d·C)``."""
        gradients = self.head_model.batch_jacobian_tensor(self._feature_batch(train_samples))
        newton_terms = tf.cast(self.ihvp_calculator.ihvp(gradients), self.value_dtype)
        kernel = tf.reshape(tf.cast(self.perturbed_kernel, self.value_dtype), [1, -1])
        return (kernel - newton_terms) / self.n_train

    def _preprocess_samples(self, samples: Batch) -> tf.Tensor:
        """``φ(t) = vec(f_t e_cᵀ)`` with ``c`` the class the model predicts for ``t``."""
        inputs, _, _ = self.influence_model.process_batch_for_loss_fn(samples)
        features = tf.cast(self.head.features(inputs, training=False), self.value_dtype)
        predicted = tf.argmax(self.influence_model(inputs), axis=1, output_type=tf.int32)
        return self._class_features(features, predicted)

    def _compute_influence_value_from_batch(self, train_samples: Batch) -> tf.Tensor:
        inputs, targets, _ = self.influence_model.process_batch_for_loss_fn(train_samples)
        features = tf.cast(self.head.features(inputs, training=False), self.value_dtype)
        classes = label_classes(targets, self.nb_classes)
        return tf.reduce_sum(self._class_features(features, classes) * self._compute_influence_vector(train_samples), 1)
