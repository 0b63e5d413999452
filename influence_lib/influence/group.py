"""Group influence: the effect of removing a whole group ``U`` of training samples at once.

Koh, Ang, Teo & Liang, "On the Accuracy of Influence Functions for Measuring Group Effects",
NeurIPS 2019 (first order); Basu, You & Feizi, "On Second-Order Group Influence Functions for
Black-Box Predictions", ICML 2020 (second order, :mod:`influence_lib.influence.second_order`).

Scale (shared by the first- and second-order calculators, so their outputs are comparable):
the group influence vector ``ψ_U`` is ``n`` times the predicted parameter change
``θ_{-U} − θ*`` when ``U`` is removed from the ``n`` training samples and the model retrained,
and the group influence value is

.. math::  I(U, T) = \\Big(\\sum_{t \\in T} g_t\\Big)^\\top \\psi_U
           \\;\\approx\\; n \\sum_{t \\in T} \\big[\\ell_t(\\theta_{-U}) - \\ell_t(\\theta^*)\\big]

i.e. ``n`` times the predicted change of the summed loss over the evaluated samples ``T``: the
"no 1/n" convention of the individual influence values (for ``U = {z}``, ``T = {t}`` the
first-order value is exactly the individual ``I(z, t)``). Positive: removing ``U`` raises the
loss on ``T`` (the group helps ``T``). ``U`` and ``T`` may have any sizes.

First order (Koh et al. 2019): ``ψ_U = Σ_{z∈U} H⁻¹ g_z = H⁻¹ Σ_{z∈U} g_z`` (one IHVP for the
whole group), so the first-order group value is the sum of the individual influences.
"""
from abc import ABC, abstractmethod

import tensorflow as tf

from ..common.datasets import batch_size_of, iterate_batches
from ..common.distribute import data_parallel
from ..common.errors import NonFiniteError
from ..common.progress import known_cardinality, progress
from ..model.influence_model import InfluenceModel
from .base import result_dtype


def summed_gradient(
    model: InfluenceModel,
    dataset: tf.data.Dataset,
    name: str,
    show_progress: bool = False,
    strategy: "tf.distribute.Strategy | None" = None,
) -> tuple[tf.Tensor, int]:
    """``Σ_i g_i`` over a batched dataset (one gradient of the summed loss per batch), and its size.

    Each batch is split across the replicas of ``strategy`` (the one in scope when None) and the
    replicas' sums are all-reduced.

    Returns
    -------
    gradient
        Shape ``(P,)``.
    count
        Number of samples in ``dataset``.
    """
    model.check_dataset(dataset, name)
    total = tf.zeros((model.nb_params,), dtype=model.dtype)
    count = 0
    batches = progress(
        iterate_batches(dataset, name), show_progress, f"Gradients of {name}", known_cardinality(dataset)
    )
    parallel = data_parallel(strategy)
    for batch in batches:
        total += parallel.sum_rows(model.batch_gradient_tensor, batch)
        count += batch_size_of(batch)
    if not bool(tf.reduce_all(tf.math.is_finite(total))):
        raise NonFiniteError(
            f"The gradients of {name} are NaN or infinite: check the model's loss on those samples."
        )
    return total, count


class GroupInfluence(ABC):
    """Group influence values ``(Σ_{t∈T} g_t)ᵀ ψ_U`` from a group influence vector (see module docstring).

    Subclasses implement :meth:`compute_influence_vector_group` and set ``model`` and ``show_progress``.
    """

    model: InfluenceModel
    show_progress: bool
    strategy: "tf.distribute.Strategy | None" = None

    @abstractmethod
    def compute_influence_vector_group(self, group: tf.data.Dataset) -> tf.Tensor:
        """Group influence vector ``ψ_U`` of the removed group ``group``, shape ``(1, P)``."""

    def estimate_influence_values_group(
        self, group_train: tf.data.Dataset, group_to_evaluate: tf.data.Dataset | None = None
    ) -> tf.Tensor:
        """Influence of removing the whole group ``group_train`` on the samples ``group_to_evaluate``.

        Parameters
        ----------
        group_train
            Batched dataset of the training samples removed together (``U``).
        group_to_evaluate
            Batched dataset of the samples whose summed loss is evaluated (``T``); any size.
            Default: ``group_train`` itself (the group's self-influence).

        Returns
        -------
        tf.Tensor
            Shape ``(1, 1)``: ``(Σ_{t∈T} g_t)ᵀ ψ_U``, ``n`` times the predicted change of the summed
            loss over ``T`` when ``U`` is removed (see the module docstring).
        """
        influence_vector = self.compute_influence_vector_group(group_train)
        evaluated = group_train if group_to_evaluate is None else group_to_evaluate
        gradient, _ = summed_gradient(self.model, evaluated, "group_to_evaluate", self.show_progress, self.strategy)
        value = tf.matmul(gradient[None], tf.cast(influence_vector, gradient.dtype), transpose_b=True)
        return tf.cast(value, result_dtype(self.model))


class FirstOrderGroupInfluence(GroupInfluence):
    """First-order group influence for :class:`~influence_lib.FirstOrderInfluenceCalculator`.

    ``ψ_U = H⁻¹ Σ_{z∈U} g_z``; with ``normalize=True`` (RelatIF) this summed vector is divided
    by its norm, as Influenciae does (then the value is not the sum of the individual values).
    Requires ``ihvp_calculator`` and ``_normalize_if_needed`` from the calculator.
    """

    def compute_influence_vector_group(self, group: tf.data.Dataset) -> tf.Tensor:
        """``H⁻¹ Σ_{z∈U} g_z`` (RelatIF-normalized if the calculator normalizes), shape ``(1, P)``."""
        gradient, _ = summed_gradient(self.model, group, "group", self.show_progress, self.strategy)
        return self._normalize_if_needed(self.ihvp_calculator.ihvp(gradient[None]))
