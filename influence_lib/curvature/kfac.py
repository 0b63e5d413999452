"""K-FAC and EK-FAC: block-diagonal Kronecker-factored curvature over every watched layer.

Each watched layer's per-sample gradient is a matrix ``G = Σ_t ā_t δ_tᵀ`` (see
:mod:`influence_lib.curvature.kronecker_blocks`). K-FAC (Martens & Grosse, "Optimizing Neural
Networks with Kronecker-factored Approximate Curvature", ICML 2015; Grosse & Martens 2016 for
convolutions) approximates the layer's Fisher block by

.. math::  F_l \\approx A \\otimes S,\\qquad A = \\mathbb{E}\\Big[\\sum_t \\bar a_t \\bar a_t^\\top\\Big],
           \\qquad S = \\mathbb{E}\\Big[\\tfrac{1}{T}\\sum_t \\delta_t \\delta_t^\\top\\Big]

(sum over positions in ``A``, mean in ``S``; for a plain Dense layer ``T = 1``). With
``A = Q_A diag(a) Q_Aᵀ`` and ``S = Q_S diag(s) Q_Sᵀ`` (float64 eigendecompositions) the
eigenvalues of ``A ⊗ S`` are ``Λ = a sᵀ``. EK-FAC (George, Laurent, Bouthillier, Ballas &
Vincent, "Fast Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis",
NeurIPS 2018) keeps the eigenbasis and refits the eigenvalues in a second pass:

.. math::  \\Lambda = \\mathbb{E}\\big[(Q_A^\\top G\\, Q_S)^{\\odot 2}\\big]

(the diagonal of the Fisher in that basis, the best diagonal fit in Frobenius norm). The damped
inverse is applied per layer to the gradient's matrix form, never to a ``P × P`` matrix:

.. math::  (F_l + \\lambda I)^{-1} \\operatorname{vec}(G) =
           \\operatorname{vec}\\big(Q_A [(Q_A^\\top G Q_S) \\oslash (\\Lambda + \\lambda)] Q_S^\\top\\big)

as in Grosse et al., "Studying Large Language Model Generalization with Influence Functions",
2023 (kronfluence). The Fisher is the empirical one (dataset labels) by default, or the true one
(labels sampled from the model, :mod:`influence_lib.curvature.true_fisher`).

Cost: one forward and backward pass over the data for ``A`` and ``S`` (and one more for EK-FAC's
``Λ``), memory ``Σ_l (d_a² + d_s²)`` (plus ``d_a·d_s`` for ``Λ``) whatever the dataset size; one
IHVP costs ``O(d_a² d_s + d_a d_s²)`` per layer. Factors can be saved per layer and reloaded
(:mod:`influence_lib.curvature.kfac_storage`).

Under a ``tf.distribute`` strategy every batch of both passes is split across the replicas and the
per-replica sums (``Σ ā āᵀ``, ``Σ δ δᵀ``, ``Σ (Q_Aᵀ G Q_S)²``) are all-reduced
(:meth:`~influence_lib.common.distribute.DataParallel.sum_rows`, as for Hessian-vector products),
so every worker ends with the factors of the whole dataset.
"""
import numpy as np
import tensorflow as tf

from ..common.compiled import compiled_method
from ..common.datasets import Batch, batch_size_of, iterate_batches
from ..common.distribute import check_strategy, data_parallel, local_variable, using_strategy
from ..common.errors import NonFiniteError
from ..common.progress import known_cardinality, progress
from ..model.influence_model import InfluenceModel
from .base import InverseHessianVectorProduct, check_damping
from .hessian import check_workers_agree
from .kfac_storage import LayerFactors, fit_with_store
from .kronecker_blocks import KroneckerBlock, kronecker_blocks
from .true_fisher import check_fisher, true_fisher_model

HEURISTIC_DAMPING = 0.1


def eigendecompose(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (clipped at 0: ``A`` and ``S`` are positive semi-definite) and eigenvectors, float64."""
    values, vectors = np.linalg.eigh(0.5 * (matrix + matrix.T).astype(np.float64))
    return np.maximum(values, 0.0), vectors


def check_kfac_damping(damping: "float | str") -> "float | str":
    """``'heuristic'`` (``0.1 × mean Λ`` per layer) or a fixed λ ≥ 0."""
    if isinstance(damping, str):
        if damping != "heuristic":
            raise ValueError(f"damping must be a number ≥ 0 or 'heuristic', got {damping!r}.")
        return damping
    return check_damping(damping)


def layer_damping(eigenvalues: np.ndarray, damping: "float | str") -> float:
    """The λ of one layer: fixed, or ``0.1 × mean(Λ)`` (the heuristic of Grosse et al. 2023)."""
    return HEURISTIC_DAMPING * float(np.mean(eigenvalues)) if damping == "heuristic" else float(damping)


def inverse_scale(eigenvalues: np.ndarray, damping: float) -> np.ndarray:
    """``1 / (Λ + λ)``; with ``λ = 0`` the pseudo-inverse (eigenvalues below ``10·n·ε₃₂·max Λ`` give 0)."""
    shifted = eigenvalues + damping
    cutoff = 0.0 if damping > 0 else 10.0 * eigenvalues.size * np.finfo(np.float32).eps * float(np.max(eigenvalues))
    kept = shifted > cutoff
    return np.where(kept, 1.0 / np.where(kept, shifted, 1.0), 0.0)


class KFACIHVP(InverseHessianVectorProduct):
    """IHVP with K-FAC curvature, block-diagonal over the watched layers.

    Parameters
    ----------
    model
        The InfluenceModel; every watched layer must be Dense, Conv1D/Conv2D, Embedding or a
        matmul-like EinsumDense.
    train_dataset
        Batched dataset over which the factors are averaged (streamed; never held in memory).
    damping
        ``'heuristic'`` (default): ``λ_l = 0.1 × mean(Λ_l)`` per layer, as kronfluence; or a fixed
        λ ≥ 0 for every layer (``0`` takes the pseudo-inverse).
    fisher
        ``'empirical'`` (default: works with any loss and is deterministic) or ``'true'`` (labels
        sampled from the model, seeded; Keras cross-entropy or MSE losses only).
    seed
        Seed of the sampled labels when ``fisher='true'``.
    factors_path
        Directory where the factors are saved (one file per layer and stage, fingerprinted with
        the model's weights, the data and the settings) and reloaded from on the next fit; a fit
        interrupted between stages resumes from the last completed one. ``None``: not saved.
    overwrite
        Replace factors saved at ``factors_path`` by another model, data or settings instead of
        raising.
    show_progress
        Progress bars over the data passes.
    strategy
        ``tf.distribute`` strategy whose replicas share the data passes (per-replica sums
        all-reduced); ``None`` uses the strategy in scope (see the "Scaling out" page). With
        ``fisher='true'`` each replica samples the labels of its own shard, so the factors equal
        the one-device ones in distribution, not sample for sample. Under a multi-worker strategy
        ``factors_path`` gets one ``worker_INDEX`` subdirectory per worker.

    Attributes
    ----------
    blocks
        The :class:`~influence_lib.curvature.kronecker_blocks.KroneckerBlock` of each watched layer.
    factors
        The :class:`LayerFactors` of each watched layer.
    layer_damping
        The λ used for each layer.
    """

    corrected_eigenvalues = False

    def __init__(
        self,
        model: InfluenceModel,
        train_dataset: tf.data.Dataset,
        damping: "float | str" = "heuristic",
        fisher: str = "empirical",
        seed: int = 0,
        factors_path: str | None = None,
        overwrite: bool = False,
        show_progress: bool = True,
        strategy: "tf.distribute.Strategy | None" = None,
    ):
        super().__init__(model, train_dataset, 0.0)
        self.strategy = check_strategy(strategy)
        self.damping = check_kfac_damping(damping)
        self.fisher = check_fisher(fisher, model)
        self.seed = int(seed)
        self.show_progress = show_progress
        self.blocks = kronecker_blocks(model)
        model.check_dataset(train_dataset, "train_dataset")
        with using_strategy(strategy):
            self.parallel = data_parallel()
        check_workers_agree(self.parallel, model, train_dataset)
        self._step = local_variable(tf.constant(0, tf.int64))
        self._fisher_model = model if fisher == "empirical" else true_fisher_model(model, self.seed, self._step)
        if factors_path is None:
            self.factors = self._fit()
        else:
            self.factors = fit_with_store(self, self.parallel.worker_path(factors_path), overwrite)
        self._prepare()

    @property
    def method(self) -> str:
        """``'ekfac'`` or ``'kfac'``."""
        return "ekfac" if self.corrected_eigenvalues else "kfac"

    def settings(self) -> dict:
        """What besides the model and data determines the factors."""
        return {"method": self.method, "fisher": self.fisher, "seed": self.seed if self.fisher == "true" else None}

    # ---------------------------------------------------------------- fitting
    def _fit(self) -> list[LayerFactors]:
        covariances = self.fit_covariances()
        factors = [self.decompose(block, a, s) for block, (a, s) in zip(self.blocks, covariances)]
        if self.corrected_eigenvalues:
            for layer_factors, eigenvalues in zip(factors, self.fit_eigenvalues(factors)):
                layer_factors.eigenvalues = eigenvalues
        return factors

    def _batches(self, desc: str, stage: int):
        """The training batches; under ``fisher='true'`` each pass and batch draws its own labels."""
        self._step.assign(stage << 32)
        batches = iterate_batches(self.train_set, "train_dataset")
        for batch in progress(batches, self.show_progress, desc, known_cardinality(self.train_set)):
            yield batch
            self._step.assign_add(1)

    def _recorded_features(self, batch: Batch) -> list[tuple[tf.Tensor, tf.Tensor]]:
        record = self._fisher_model._record(batch)
        if record is None:
            raise ValueError(f"The watched layers cannot be recorded for K-FAC: {self._fisher_model.fallback_reason}.")
        return [block.features(calls) for block, calls in zip(self.blocks, record.calls)]

    @compiled_method
    def _batch_covariances(self, batch: Batch) -> list[tuple[tf.Tensor, tf.Tensor]]:
        """Per layer ``Σ_{i,t} ā ā ᵀ`` (diagonal: token counts) and ``Σ_i (1/T) Σ_t δ δᵀ`` of one batch."""
        sums = []
        for block, (inputs, delta) in zip(self.blocks, self._recorded_features(batch)):
            positions = tf.cast(tf.shape(delta)[1], delta.dtype)
            flat_delta = tf.reshape(delta, [-1, block.output_dim])
            s_sum = tf.matmul(flat_delta, flat_delta, transpose_a=True) / positions
            if block.diagonal_input:
                ids = tf.reshape(inputs, [-1])
                a_sum = tf.math.unsorted_segment_sum(tf.ones_like(ids, delta.dtype), ids, block.input_dim)
            else:
                flat_inputs = tf.reshape(inputs, [-1, block.input_dim])
                a_sum = tf.matmul(flat_inputs, flat_inputs, transpose_a=True)
            sums.append((a_sum, s_sum))
        return sums

    def fit_covariances(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """First pass: ``A`` and ``S`` of every layer, averaged over the training samples (float64)."""
        totals, count = None, 0
        for batch in self._batches("K-FAC factors", 0):
            sums = self.parallel.sum_rows(self._batch_covariances, batch)
            sums = [(a.numpy().astype(np.float64), s.numpy().astype(np.float64)) for a, s in sums]
            totals = sums if totals is None else [(ta + a, ts + s) for (ta, ts), (a, s) in zip(totals, sums)]
            count += batch_size_of(batch)
        covariances = [(a / count, s / count) for a, s in totals]
        for block, (a, s) in zip(self.blocks, covariances):
            if not (np.isfinite(a).all() and np.isfinite(s).all()):
                raise NonFiniteError(
                    f"The K-FAC factors of layer {block.layer.name!r} are NaN or infinite: check the training "
                    "data's inputs and labels, and that the model's loss is finite on them."
                )
        return covariances

    def decompose(self, block: KroneckerBlock, a: np.ndarray, s: np.ndarray) -> LayerFactors:
        """Eigendecompose ``A`` and ``S`` (float64) and form K-FAC's eigenvalues ``Λ = a sᵀ``."""
        s_values, s_vectors = eigendecompose(s)
        if block.diagonal_input:
            a_values, a_vectors = np.maximum(a, 0.0), None
        else:
            a_values, a_vectors = eigendecompose(a)
        return LayerFactors(a, s, a_vectors, s_vectors, np.outer(a_values, s_values))

    @compiled_method
    def _batch_eigenvalues(self, batch: Batch, a_vectors: list, s_vectors: list) -> list[tf.Tensor]:
        """Per layer ``Σ_i (Q_Aᵀ G_i Q_S)^2`` of one batch, ``(d_a, d_s)``."""
        sums = []
        for block, (inputs, delta), q_a, q_s in zip(self.blocks, self._recorded_features(batch), a_vectors, s_vectors):
            rotated_delta = tf.matmul(delta, q_s)
            if block.diagonal_input:
                sums.append(_embedding_squared_sums(inputs, rotated_delta, block.input_dim))
                continue
            rotated_inputs = tf.matmul(inputs, q_a)
            if inputs.shape[1] == 1:
                squared_inputs, squared_delta = tf.square(rotated_inputs[:, 0]), tf.square(rotated_delta[:, 0])
                sums.append(tf.matmul(squared_inputs, squared_delta, transpose_a=True))
            else:
                rotated = tf.matmul(rotated_inputs, rotated_delta, transpose_a=True)
                sums.append(tf.reduce_sum(tf.square(rotated), axis=0))
        return sums

    def fit_eigenvalues(self, factors: list[LayerFactors]) -> list[np.ndarray]:
        """Second pass (EK-FAC): ``Λ = E[(Q_Aᵀ G Q_S)²]`` of every layer (float64)."""
        dtype = self.model.dtype
        a_vectors = [
            tf.zeros((0, 0), dtype) if f.a_eigenvectors is None else tf.constant(f.a_eigenvectors, dtype)
            for f in factors
        ]
        s_vectors = [tf.constant(f.s_eigenvectors, dtype) for f in factors]
        totals, count = None, 0
        for batch in self._batches("EK-FAC eigenvalues", 1):
            batch_sums = self.parallel.sum_rows(self._batch_eigenvalues, batch, a_vectors, s_vectors)
            sums = [value.numpy().astype(np.float64) for value in batch_sums]
            totals = sums if totals is None else [t + s for t, s in zip(totals, sums)]
            count += batch_size_of(batch)
        return [total / count for total in totals]

    # ---------------------------------------------------------------- applying
    def _prepare(self) -> None:
        """Per-layer damping and the tensors (in the model's dtype) the products use."""
        dtype = self.model.dtype
        self.layer_damping = [layer_damping(f.eigenvalues, self.damping) for f in self.factors]
        self._a_vectors = [
            None if f.a_eigenvectors is None else tf.constant(f.a_eigenvectors, dtype) for f in self.factors
        ]
        self._s_vectors = [tf.constant(f.s_eigenvectors, dtype) for f in self.factors]
        self._inverse_scales = [
            tf.constant(inverse_scale(f.eigenvalues, lam), dtype) for f, lam in zip(self.factors, self.layer_damping)
        ]
        self._scales = [tf.constant(f.eigenvalues + lam, dtype) for f, lam in zip(self.factors, self.layer_damping)]

    def _scaled_in_eigenbasis(self, matrices: tf.Tensor, index: int, scale: tf.Tensor) -> tf.Tensor:
        """``Q_A [(Q_Aᵀ M Q_S) ⊙ scale] Q_Sᵀ`` for a batch of matrices ``(k, d_a, d_s)``."""
        q_a, q_s = self._a_vectors[index], self._s_vectors[index]
        rotated = tf.matmul(matrices, q_s)
        if q_a is not None:
            rotated = tf.matmul(q_a, rotated, transpose_a=True)
        rotated = rotated * scale
        if q_a is not None:
            rotated = tf.matmul(q_a, rotated)
        return tf.matmul(rotated, q_s, transpose_b=True)

    def split_blocks(self, vectors: tf.Tensor) -> list[tf.Tensor]:
        """Flat vectors ``(k, P)`` as one matrix batch ``(k, d_a, d_s)`` per watched layer."""
        parts = tf.split(vectors, [block.size for block in self.blocks], axis=1)
        return [block.to_matrix(part) for block, part in zip(self.blocks, parts)]

    def join_blocks(self, matrices: list[tf.Tensor]) -> tf.Tensor:
        """Inverse of :meth:`split_blocks`."""
        return tf.concat([block.from_matrix(m) for block, m in zip(self.blocks, matrices)], axis=1)

    @compiled_method
    def ihvp_matrices(self, vectors: tf.Tensor) -> list[tf.Tensor]:
        """``(F_l + λ_l I)⁻¹ g_l`` of each layer in matrix form ``(k, d_a, d_s)``."""
        return [
            self._scaled_in_eigenbasis(matrices, index, self._inverse_scales[index])
            for index, matrices in enumerate(self.split_blocks(vectors))
        ]

    @compiled_method
    def _hvp_tensor(self, vectors: tf.Tensor) -> tf.Tensor:
        return self.join_blocks([
            self._scaled_in_eigenbasis(matrices, index, self._scales[index])
            for index, matrices in enumerate(self.split_blocks(vectors))
        ])

    def ihvp(self, vectors: tf.Tensor) -> tf.Tensor:
        return self.join_blocks(self.ihvp_matrices(self.check_vectors(vectors)))

    def quadratic_forms(self, features: list[tuple[tf.Tensor, tf.Tensor]]) -> tf.Tensor:
        """``g_iᵀ (F̂ + λ)⁻¹ g_i`` of each sample from its layers' ``(ā, δ)``, shape ``(B,)``.

        In the eigenbasis, ``Σ_l Σ ((Q_Aᵀ G_l Q_S)² ⊘ (Λ_l + λ_l))`` with the rotated gradient
        ``Q_Aᵀ G Q_S = Σ_t (Q_Aᵀ ā_t)(Q_Sᵀ δ_t)ᵀ`` formed from the rotated features: for a Dense
        layer on 2-D inputs ``Σ_ij (ã_i)² W_ij (δ̃_j)²``, ``O(d_a² + d_s² + d_a d_s)`` per sample
        instead of the ``O(d_a² d_s + d_a d_s²)`` of an IHVP. Same value as ``Σ g ⊙ ihvp(g)``.
        """
        totals = []
        for index, (block, (inputs, delta)) in enumerate(zip(self.blocks, features)):
            rotated_delta = tf.matmul(delta, self._s_vectors[index])
            weights = self._inverse_scales[index]
            if block.diagonal_input:
                ids = tf.cast(inputs, tf.int64)
                batch = tf.shape(ids, out_type=tf.int64)[0]
                keys = tf.reshape(ids + block.input_dim * tf.range(batch)[:, None], [-1])
                unique, positions = tf.unique(keys)
                flat = tf.reshape(rotated_delta, [-1, block.output_dim])
                per_pair = tf.math.unsorted_segment_sum(flat, positions, tf.shape(unique)[0])
                terms = tf.reduce_sum(tf.square(per_pair) * tf.gather(weights, unique % block.input_dim), axis=1)
                totals.append(tf.math.unsorted_segment_sum(terms, unique // block.input_dim, batch))
                continue
            rotated_inputs = tf.matmul(inputs, self._a_vectors[index])
            if inputs.shape[1] == 1:
                left = tf.matmul(tf.square(rotated_inputs[:, 0]), weights)
                totals.append(tf.reduce_sum(left * tf.square(rotated_delta[:, 0]), axis=1))
            else:
                rotated = tf.matmul(rotated_inputs, rotated_delta, transpose_a=True)
                totals.append(tf.reduce_sum(tf.square(rotated) * weights, axis=[1, 2]))
        return tf.add_n(totals)

    def hvp(self, vectors: tf.Tensor) -> tf.Tensor:
        return self._hvp_tensor(self.check_vectors(vectors))


class EKFACIHVP(KFACIHVP):
    """IHVP with EK-FAC curvature: K-FAC's eigenbasis, eigenvalues refit in a second data pass.

    Same parameters as :class:`KFACIHVP`; ``factors[l].eigenvalues`` holds the corrected
    ``Λ = E[(Q_Aᵀ G Q_S)²]``.
    """

    corrected_eigenvalues = True


def _embedding_squared_sums(ids: tf.Tensor, rotated_delta: tf.Tensor, vocabulary: int) -> tf.Tensor:
    """``Σ_i (G_i Q_S)²`` for an Embedding, ``G_i[v] = Σ_{t: id_t = v} δ_t``, without a ``(B, V, d)`` tensor.

    The rows of each sample's gradient are summed per distinct (sample, token) pair, squared, then
    added per token: memory ``O(B·T·d)``.
    """
    batch = tf.shape(ids, out_type=tf.int64)[0]
    keys = tf.reshape(ids + vocabulary * tf.range(batch)[:, None], [-1])
    unique, positions = tf.unique(keys)
    flat_delta = tf.reshape(rotated_delta, [-1, rotated_delta.shape[-1]])
    per_pair = tf.math.unsorted_segment_sum(flat_delta, positions, tf.shape(unique)[0])
    return tf.math.unsorted_segment_sum(tf.square(per_pair), unique % vocabulary, vocabulary)
