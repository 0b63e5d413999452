"""Self-influence from the distance of a sample to the decision boundary, in input space.

DeepFool (Moosavi-Dezfooli et al., CVPR 2016) moves each training input ``x`` to the nearest
point ``x_adv`` of the decision boundary of the trained classifier; the score is

.. math::  s(x) = -\\|x - x_{adv}\\|_2

so that samples close to the boundary — atypical or mislabeled ones, more so when the model
overfits — get the highest self-influence. As in Influenciae, the attack starts from the class
the model predicts, applies no overshoot, and the model's outputs (logits or probabilities, as
the model returns them) are the class scores. Only self-influence is defined (no pairwise value).
"""
import keras
import tensorflow as tf

from ..common.compiled import compiled_function
from ..common.datasets import Batch, check_dataset
from ..common.errors import NonFiniteError
from ..common.distribute import check_strategy
from ._deepfool import check_classifier_outputs, check_deepfool_arguments, deepfool
from .base import SelfInfluenceCalculator


def check_single_output(model: keras.Model, calculator: str) -> None:
    """Refuse a model with several outputs: the boundary is that of one classifier head."""
    outputs = getattr(model, "outputs", None)
    if outputs and len(outputs) > 1:
        raise ValueError(
            f"{calculator} needs a classifier with a single output, but the model has {len(outputs)} outputs "
            f"{[tuple(output.shape) for output in outputs]}. Explain one head at a time: "
            "keras.Model(model.inputs, model.outputs[i])."
        )


def checked_distances(distances: tf.Tensor, start_outputs_finite: tf.Tensor) -> tf.Tensor:
    """``distances``, raising :class:`NonFiniteError` for samples whose model outputs are NaN or infinite
    (a distance of 0 would be reported for them otherwise)."""
    if not bool(tf.reduce_all(start_outputs_finite)):
        bad = tf.where(~start_outputs_finite)[:, 0].numpy().tolist()[:10]
        raise NonFiniteError(
            f"The model's outputs are NaN or infinite for the samples at positions {bad} of the batch, so their "
            "distance to the decision boundary is undefined: check the model's weights (NaN after a diverged "
            "training?) and those inputs."
        )
    return distances


class SampleBoundaryCalculator(SelfInfluenceCalculator):
    """Minus the ℓ2 distance from each sample to the decision boundary (DeepFool in input space).

    The whole batch is attacked at once: every sample takes its DeepFool steps together with the
    others (one vectorized input-Jacobian per step), and samples that reached the boundary are
    frozen by a mask. The model's weights are only read. The attack runs in :attr:`value_dtype`:
    float64 for a float64 model, else float32.

    Parameters
    ----------
    model
        A trained Keras classifier with a single input and one output per class (≥ 2 classes).
    step_nbr
        Maximum number of DeepFool steps per sample.
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
        eps: float = 1e-6,
        show_progress: bool = True,
        strategy: "tf.distribute.Strategy | None" = None,
    ):
        if not isinstance(model, keras.Model):
            raise TypeError(f"model must be a keras.Model, got {type(model).__name__}.")
        check_deepfool_arguments(step_nbr, eps)
        check_single_output(model, "SampleBoundaryCalculator")
        symbolic_outputs = getattr(model, "outputs", None)
        if symbolic_outputs:
            check_classifier_outputs(symbolic_outputs[0], "The model")
        self.model = model
        self.step_nbr = step_nbr
        self.eps = float(eps)
        self.show_progress = show_progress
        self.strategy = check_strategy(strategy)

    def _check_dataset(self, dataset: tf.data.Dataset, name: str) -> None:
        check_dataset(dataset, name)
        if not isinstance(dataset.element_spec, tuple) or not isinstance(dataset.element_spec[0], tf.TensorSpec):
            raise TypeError(f"{name} must yield (inputs, targets) tuples whose inputs are a single tensor.")

    @compiled_function
    def _boundary_distances(self, inputs: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Distances ``(B,)`` and whether each sample's outputs at the start are finite ``(B,)``."""
        inputs = tf.cast(inputs, self.value_dtype)
        sample_shape = tf.shape(inputs)[1:]
        batch = tf.shape(inputs)[0]

        def outputs_of(points: tf.Tensor) -> tf.Tensor:
            restored = tf.reshape(points, tf.concat([[batch], sample_shape], axis=0))
            outputs = self.model(restored, training=False)
            if not isinstance(outputs, tf.Tensor):
                raise ValueError(
                    "SampleBoundaryCalculator needs a classifier returning one tensor of class scores, got "
                    f"{type(outputs).__name__}: explain one head at a time."
                )
            outputs = tf.cast(outputs, self.value_dtype)
            check_classifier_outputs(outputs, "The model")
            return outputs

        start = tf.reshape(inputs, [batch, -1])
        finite = tf.reduce_all(tf.math.is_finite(outputs_of(start)), axis=1)
        reached = deepfool(outputs_of, start, self.step_nbr, self.eps, dual_q=2.0)
        return tf.norm(reached - start, axis=1), finite

    def _compute_influence_value_from_batch(self, train_samples: Batch) -> tf.Tensor:
        return -checked_distances(*self._boundary_distances(train_samples[0]))
