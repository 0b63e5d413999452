"""Second-order group influence (Basu, You & Feizi, "On Second-Order Group Influence Functions
for Black-Box Predictions", ICML 2020).

Removing a group ``U`` of ``m`` samples from the ``n`` training samples (fraction ``p = m/n``)
and retraining gives

.. math::  \\theta_{-U} = \\arg\\min_\\theta \\frac{1}{n - m} \\sum_{i \\notin U} \\ell_i(\\theta)
           = \\arg\\min_\\theta\\; R(\\theta) - p\\, R_U(\\theta)

with ``R`` the mean training loss and ``R_U`` the mean loss over ``U``. Expanding the optimality
condition around ``θ*`` in powers of ``p`` (third derivatives of the loss neglected, as in the
paper) with ``H = ∇²R``, ``g_U = ∇R_U``, ``H_U = ∇²R_U`` gives
``θ_{-U} − θ* = p H⁻¹ g_U + p² H⁻¹ H_U H⁻¹ g_U + O(p³)``: the first term is the first-order
group influence (sum of individual influences), the second the pairwise interaction of the
removed samples — ``(1/n²) Σ_{z,z'∈U} H⁻¹ ∇²ℓ_z H⁻¹ g_{z'}``. Basu et al. obtain it with the
coefficients below, which agree with this expansion to order ``p²`` and come from
renormalizing the perturbed objective; we use theirs:

.. math::  \\psi^{(2)}_U = \\frac{1 - 2p}{(1-p)^2} \\sum_{z \\in U} H^{-1} g_z
           + \\frac{1}{(1-p)^2\\, n}\\, H^{-1} \\Big(\\sum_{z \\in U} \\nabla^2 \\ell_z\\Big)
             H^{-1} \\sum_{z \\in U} g_z

Scale: ``ψ⁽²⁾_U`` is ``n (θ_{-U} − θ*)`` predicted to second order, the same scale as the
first-order ``ψ_U = Σ_{z∈U} H⁻¹ g_z`` of
:meth:`~influence_lib.FirstOrderInfluenceCalculator.compute_influence_vector_group` (Influenciae's
"no 1/n" convention), and :meth:`estimate_influence_values_group` returns
``(Σ_{t∈T} g_t)ᵀ ψ⁽²⁾_U ≈ n Σ_{t∈T} [ℓ_t(θ_{-U}) − ℓ_t(θ*)]`` — directly comparable with the
first-order group value. (Influenciae divides the second-order vector by ``n`` but not the
first-order one, so its two outputs differ by a factor ``n``.)

Cost: 2 IHVPs and one pass of Hessian-vector products over ``U`` (no per-sample Hessian).
``n`` is the number of samples in the training dataset given at construction; ``U`` must be a
strict subset of it (``m < n``).
"""
import tensorflow as tf

from ..common.datasets import element_count, iterate_batches
from ..common.distribute import check_strategy, data_parallel, using_strategy
from ..common.progress import known_cardinality, progress
from ..curvature.base import InverseHessianVectorProduct
from ..curvature.factory import IHVPCalculator, InverseHessianVectorProductFactory
from ..model.influence_model import InfluenceModel
from .first_order import fit_curvature
from .group import GroupInfluence, summed_gradient


class SecondOrderInfluenceCalculator(GroupInfluence):
    """Group influence with the pairwise-interaction (second-order) term of Basu et al. 2020.

    Parameters
    ----------
    model
        The InfluenceModel (watched weights, loss).
    dataset
        Batched training dataset (its size is ``n``); the Hessian is averaged over it (or a subset).
    ihvp_calculator
        ``'exact'``, ``'cgd'``, ``'lissa'``, ``'arnoldi'``, an :class:`IHVPCalculator`, a factory,
        or a ready :class:`InverseHessianVectorProduct` built on ``model``.
    n_samples_for_hessian
        Average the Hessian over this many samples drawn from ``dataset`` (all when None).
    shuffle_buffer_size
        Shuffle buffer used when drawing that subset.
    show_progress
        Show progress bars.
    seed
        Seed of the Hessian subset draw.
    strategy
        ``tf.distribute`` strategy to run on (data-parallel over its replicas); ``None`` uses the
        strategy in scope (see the "Scaling out" page of the documentation).

    Attributes
    ----------
    train_size
        ``n``, the number of training samples.
    """

    def __init__(
        self,
        model: InfluenceModel,
        dataset: tf.data.Dataset,
        ihvp_calculator: "str | IHVPCalculator | InverseHessianVectorProduct | InverseHessianVectorProductFactory" = (
            "exact"
        ),
        n_samples_for_hessian: int | None = None,
        shuffle_buffer_size: int = 10000,
        show_progress: bool = True,
        seed: int = 0,
        strategy: "tf.distribute.Strategy | None" = None,
    ):
        self.strategy = check_strategy(strategy)
        with using_strategy(strategy):
            self.train_set, self.ihvp_calculator = fit_curvature(
                model, dataset, ihvp_calculator, n_samples_for_hessian, shuffle_buffer_size, seed, show_progress
            )
        self.model = model
        self.show_progress = show_progress
        self.train_size = element_count(dataset)

    def _summed_hvp(self, group: tf.data.Dataset, vector: tf.Tensor) -> tf.Tensor:
        """``(Σ_{z∈U} ∇²ℓ_z) v``, shape ``(1, P)``."""
        total = tf.zeros_like(vector)
        parallel = data_parallel(self.strategy)
        batches = progress(iterate_batches(group, "group"), self.show_progress, "Group HVP", known_cardinality(group))
        for batch in batches:
            total += parallel.sum_rows(self.model.batch_hvp_tensor, batch, vector)
        return total

    def compute_influence_vector_group(self, group: tf.data.Dataset) -> tf.Tensor:
        """Second-order group influence vector ``ψ⁽²⁾_U`` (see the module docstring), shape ``(1, P)``.

        ``ψ⁽²⁾_U / n`` predicts the parameter change when ``group`` is removed and the model retrained.
        """
        gradient, group_size = summed_gradient(self.model, group, "group", self.show_progress, self.strategy)
        if group_size >= self.train_size:
            raise ValueError(
                f"The group has {group_size} samples but the training set only {self.train_size}: the group "
                "removed must be a strict subset of the training dataset given to the calculator."
            )
        n = float(self.train_size)
        fraction = group_size / n
        first_order = self.ihvp_calculator.ihvp(gradient[None])
        interaction = self.ihvp_calculator.ihvp(self._summed_hvp(group, first_order))
        additive_coefficient = (1.0 - 2.0 * fraction) / (1.0 - fraction) ** 2
        interaction_coefficient = 1.0 / ((1.0 - fraction) ** 2 * n)
        return additive_coefficient * first_order + interaction_coefficient * interaction
