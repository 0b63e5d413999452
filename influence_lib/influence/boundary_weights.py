"""Self-influence from how far the last layer's weights must move to flip a sample's prediction.

For each training sample ``x`` with features ``f = Φ(x)`` (the input of the final Dense layer),
DeepFool (Moosavi-Dezfooli et al., CVPR 2016) is run in the space of that layer's parameters
``w = (W, b)`` — the classifier ``w ↦ activation(f W + b)`` — to find the nearest weights
``w_adv`` for which the prediction of ``x`` changes. The score is

.. math::  s(x) = -\\|w - w_{adv}\\|_p

so samples whose prediction flips under the smallest change of the weights (atypical or
mislabeled ones) get the highest self-influence.

For a head without activation, the logit gap ``z_k − z_c`` is linear in ``w`` with gradient
``f ⊗ (e_k − e_c)`` (and ``e_k − e_c`` for the bias), so the distance is analytic:
``min_{k≠c} |z_k − z_c| / ‖(f ⊗ (e_k − e_c), e_k − e_c)‖_q``, e.g. ``|z_k − z_c| / √(2(‖f‖² + 1))`` in ℓ2.

Differences with Influenciae: only the last (Dense) layer is attacked — Influenciae perturbs all
trainable weights, one sample at a time, by assigning to the model's variables. Here every sample
of a batch gets its own copy of the head parameters as a tensor and all samples step together,
so the model's variables are never written to: the model cannot be left modified, even when an
error interrupts the computation. The ℓ_p step uses the dual exponent ``q = p/(p−1)`` of DeepFool's
paper (Influenciae uses ``p`` in place of ``q``; both coincide for ``p = 2``, the default).
"""
import keras
import tensorflow as tf

from ..common.compiled import compiled_function
from ..common.datasets import Batch, check_dataset
from ..common.distribute import check_strategy
from ._deepfool import check_classifier_outputs, check_deepfool_arguments, deepfool, dual_exponent
from ._dense_head import split_dense_head
from .base import SelfInfluenceCalculator
from .boundary_sample import check_single_output, checked_distances


class WeightsBoundaryCalculator(SelfInfluenceCalculator):
    """Minus the ℓ_p distance in the last layer's weight space to the boundary that flips each sample.

    The attack runs in :attr:`value_dtype`: float64 for a float64 model, else float32.

    Parameters
    ----------
    model
        A trained Keras classifier (Functional or Sequential) ending with a Dense layer with one
        output per class (≥ 2 classes); any activation.
    step_nbr
        Maximum number of DeepFool steps per sample.
    norm_type
        ``p`` of the ℓ_p norm of the weight change: a number larger than 1 or ``np.inf``.
    eps
        A sample is on the boundary once its two largest outputs differ by at most ``eps``.
    show_progress
        Show a progress bar over the batches.
    strategy
        ``tf.distribute`` strategy to run on (data-parallel over its replicas); ``None`` uses the
        strategy in scope (see the "Scaling out" page of the documentation).
    """

    def __init__(
        self,
        model: keras.Model,
        step_nbr: int = 100,
        norm_type: float = 2,
        eps: float = 1e-6,
        show_progress: bool = True,
        strategy: "tf.distribute.Strategy | None" = None,
    ):
        check_deepfool_arguments(step_nbr, eps)
        check_single_output(model, "WeightsBoundaryCalculator")
        self.dual_q = dual_exponent(norm_type)
        self.head = split_dense_head(model, -1)
        check_classifier_outputs(model.outputs[0], "The model's last layer")
        self.model = model
        self.step_nbr = step_nbr
        self.norm_type = norm_type
        self.eps = float(eps)
        self.show_progress = show_progress
        self.strategy = check_strategy(strategy)

    def _check_dataset(self, dataset: tf.data.Dataset, name: str) -> None:
        check_dataset(dataset, name)

    @compiled_function
    def _weight_distances(self, inputs) -> tuple[tf.Tensor, tf.Tensor]:
        """Distances ``(B,)`` and whether each sample's head outputs at the start are finite ``(B,)``."""
        features = tf.cast(self.head.features(inputs, training=False), self.value_dtype)
        kernel = tf.cast(self.head.kernel, self.value_dtype)
        in_dim, classes = kernel.shape
        batch = tf.shape(features)[0]
        parameters = [tf.reshape(kernel, [-1])]
        if self.head.bias is not None:
            parameters.append(tf.cast(self.head.bias, self.value_dtype))
        start = tf.tile(tf.concat(parameters, axis=0)[None], [batch, 1])

        def outputs_of(points: tf.Tensor) -> tf.Tensor:
            kernels = tf.reshape(points[:, : in_dim * classes], [-1, in_dim, classes])
            logits = tf.einsum("bd,bdc->bc", features, kernels)
            if self.head.bias is not None:
                logits = logits + points[:, in_dim * classes :]
            outputs = tf.cast(self.head.activation(logits), self.value_dtype)
            check_classifier_outputs(outputs, "The model's last layer")
            return outputs

        finite = tf.reduce_all(tf.math.is_finite(outputs_of(start)), axis=1)
        reached = deepfool(outputs_of, start, self.step_nbr, self.eps, self.dual_q)
        change = reached - start
        if self.dual_q == 1.0:
            return tf.reduce_max(tf.abs(change), axis=1), finite
        return tf.reduce_sum(tf.abs(change) ** self.norm_type, axis=1) ** (1.0 / self.norm_type), finite

    def _compute_influence_value_from_batch(self, train_samples: Batch) -> tf.Tensor:
        return -checked_distances(*self._weight_distances(train_samples[0]))
