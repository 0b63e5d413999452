"""Random projections of per-sample gradients: ``φ_i = Rᵀ g_i ∈ ℝᵏ`` without the ``P × k`` matrix.

A random matrix ``R ∈ ℝ^{P×k}`` with independent entries of mean 0 and variance ``1/k``
(Gaussian, or Rademacher ``±1/√k``) preserves inner products in expectation,
``E[⟨Rᵀx, Rᵀy⟩] = ⟨x, y⟩``, and, by the Johnson–Lindenstrauss lemma, within ``ε‖x‖‖y‖`` for
all pairs of ``n`` vectors with high probability once ``k = O(log n / ε²)`` (Johnson &
Lindenstrauss 1984; Achlioptas, "Database-friendly random projections", 2003, for ±1 entries).
TRAK (Park et al., ICML 2023) and Captum's ``TracInCPFastRandProj`` attribute through such
projected gradients.

Two ways to apply ``R``, per watched layer, summed over layers into the same ``k`` coordinates
(stacking the layers' blocks of rows gives one projection of the whole gradient):

* **dense**: the layer's per-sample gradient block ``G_l (B, P_l)`` times ``R_l``, ``R_l``
  generated in chunks of :data:`CHUNK_ROWS` rows from a *stateless* RNG (``tf.random.stateless_*``
  seeded by ``(seed, layer, chunk)``, Philox), so it is the same on every run and device and at
  most one chunk exists at a time (or the whole ``R_l`` is kept when it is smaller than
  ``Projection.max_cached_bytes``).
* **structured** (Dense and Conv1D/Conv2D layers): the per-sample gradient is
  ``G_i = Σ_t ã_{i,t} ⊗ δ_{i,t}`` (``ã = [a, 1]`` the layer input — the patch at output position
  ``t`` for a convolution — with a 1 for the bias, ``δ`` the output gradient), so with
  ``R_l = R_a ⊗ R_δ`` (``k = k_a k_δ``)

  .. math::

     R_l^\\top \\operatorname{vec}(G_i) =
     \\operatorname{vec}\\Big(\\sum_t (R_a^\\top ã_{i,t})\\,(R_δ^\\top δ_{i,t})^\\top\\Big)

  is computed without ever forming ``G_i``: ``R_aᵀ ã`` is the layer itself applied with ``R_a``
  as its kernel (a convolution for Conv layers), as in LoGra (Choe et al., "What is Your Data
  Worth to GPT?", 2024). Cost per sample ``O(T(d_a k_a + d_out k_δ + k_a k_δ))`` instead of
  ``O(P_l k)``. The Kronecker matrix is still unbiased (``E[R_l R_lᵀ] = I``) but its inner
  products vary more than those of a dense ``R`` of the same ``k`` (the product of two
  estimates from ``k_a`` and ``k_δ`` dimensions), so a side small enough is not compressed at
  all: its factor is a diagonal of random signs (``R Rᵀ = I``). With ``d_a`` and ``d_out`` the
  two sides: if ``d_a d_out ≤ k`` neither side is compressed, else if ``d_out² ≤ k`` only ``a``
  is (``k_a = ⌊k/d_out⌋``), else if ``d_a² ≤ k`` only ``δ`` is, else both (``k_δ = ⌊√k⌋``,
  ``k_a = ⌊k/k_δ⌋``). Each layer's ``k_a k_δ`` coordinates follow the previous layer's (mod ``k``),
  so while the layers' sizes add up to at most ``k`` the projection is an exact isometry.

Any other layer, or a model whose forward pass cannot be recorded, uses the dense projection of
its per-sample gradients (closed form or jacobian).
"""
import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from ..common.compiled import compiled_method
from ..common.datasets import Batch
from .influence_model import InfluenceModel
from .layer_rules import ConvRule, DenseRule, LayerCall

CHUNK_ROWS = 2048
KINDS = ("rademacher", "gaussian")
_PART_DENSE, _PART_INPUT, _PART_OUTPUT = 0, 1, 2


@dataclass(frozen=True)
class Projection:
    """Settings of a seeded random projection of gradients to ``dimension`` coordinates.

    Parameters
    ----------
    dimension
        ``k``, the number of coordinates of each projected gradient.
    seed
        Seed of the random matrix: the same seed gives the same projection on every run.
    kind
        ``'rademacher'`` (entries ``±1/√k``, default) or ``'gaussian'`` (``N(0, 1/k)``).
    structured
        Project Dense and Conv layers as ``R_a ⊗ R_δ`` without forming their gradients
        (default). ``False``: dense projection of every layer's gradients.
    max_cached_bytes
        A layer's dense matrix ``R_l`` smaller than this is generated once and kept; larger
        ones are regenerated chunk by chunk at every batch (never held whole).
    """

    dimension: int
    seed: int = 0
    kind: str = "rademacher"
    structured: bool = True
    max_cached_bytes: int = 64 * 2**20

    def __post_init__(self):
        if isinstance(self.dimension, bool) or not isinstance(self.dimension, (int, np.integer)) or self.dimension < 1:
            raise ValueError(f"Projection dimension must be a positive integer, got {self.dimension!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed < 2**31:
            raise ValueError(f"Projection seed must be an integer in [0, 2**31), got {self.seed!r}.")
        if self.kind not in KINDS:
            raise ValueError(f"Projection kind must be one of {KINDS}, got {self.kind!r}.")

    def with_seed(self, seed: int) -> "Projection":
        """The same settings with another seed (independent projections for several models)."""
        return Projection(self.dimension, seed, self.kind, self.structured, self.max_cached_bytes)

    def settings(self) -> dict:
        """The settings as a JSON-able dict (for fingerprints)."""
        return {
            "dimension": int(self.dimension), "seed": int(self.seed), "kind": self.kind,
            "structured": bool(self.structured), "chunk_rows": CHUNK_ROWS,
        }


def random_matrix(seed: int, salt: int, rows: int, columns: int, kind: str) -> tf.Tensor:
    """A ``(rows, columns)`` float32 random matrix, entries of mean 0 and variance ``1/columns``,
    from the stateless Philox RNG seeded by ``(seed, salt)``."""
    return _stateless(tf.constant([seed, salt], dtype=tf.int64), rows, columns, kind)


def _salt(layer: int, part: int, chunk: int = 0) -> int:
    return (layer << 40) | (part << 32) | chunk


def dense_matrix(projection: Projection, layer: int, rows: int) -> tf.Tensor:
    """The whole ``(rows, k)`` dense projection matrix of a layer, chunk by chunk (for tests and caching)."""
    chunks = [
        random_matrix(projection.seed, _salt(layer, _PART_DENSE, c), min(CHUNK_ROWS, rows - start),
                      projection.dimension, projection.kind)
        for c, start in enumerate(range(0, rows, CHUNK_ROWS))
    ]
    return tf.concat(chunks, axis=0)


def project_dense(gradients: tf.Tensor, projection: Projection, layer: int = 0) -> tf.Tensor:
    """``gradients (B, P) @ R`` with ``R (P, k)`` generated and used one chunk of rows at a time.

    Memory ``O(B·k + CHUNK_ROWS·k)`` on top of ``gradients``; the result does not depend on the batch.
    Computed in float64 for float64 gradients, else in float32.
    """
    dtype = tf.float64 if gradients.dtype == tf.float64 else tf.float32
    gradients = tf.cast(gradients, dtype)
    rows, k = int(gradients.shape[1]), projection.dimension
    full, tail = divmod(rows, CHUNK_ROWS)
    result = tf.zeros(tf.stack([tf.shape(gradients)[0], k]), dtype)
    if full:
        def body(chunk, total):
            block = gradients[:, chunk * CHUNK_ROWS : (chunk + 1) * CHUNK_ROWS]
            salt = _salt(layer, _PART_DENSE) + tf.cast(chunk, tf.int64)
            seeds = tf.stack([tf.constant(projection.seed, tf.int64), salt])
            matrix = _stateless(seeds, CHUNK_ROWS, k, projection.kind)
            return chunk + 1, total + tf.matmul(block, tf.cast(matrix, dtype))

        _, result = tf.while_loop(lambda chunk, _: chunk < full, body, (tf.constant(0), result))
    if tail:
        matrix = random_matrix(projection.seed, _salt(layer, _PART_DENSE, full), tail, k, projection.kind)
        result += tf.matmul(gradients[:, full * CHUNK_ROWS :], tf.cast(matrix, dtype))
    return result


def _stateless(seeds: tf.Tensor, rows: int, columns: int, kind: str) -> tf.Tensor:
    """:func:`random_matrix` with a seed tensor (also usable inside a loop over chunks)."""
    scale = 1.0 / math.sqrt(columns)
    if kind == "gaussian":
        return tf.random.stateless_normal([rows, columns], seeds, stddev=scale, alg="philox")
    signs = tf.random.stateless_uniform([rows, columns], seeds, minval=0, maxval=2, dtype=tf.int32, alg="philox")
    return tf.cast(2 * signs - 1, tf.float32) * scale


class GradientProjector:
    """Projected per-sample gradients ``Rᵀ ∇_θ ℓ(z_i)`` of an :class:`InfluenceModel`, batch by batch.

    Parameters
    ----------
    model
        The model and watched weights (its loss, or a measurement view from
        :meth:`InfluenceModel.with_measurement`, is what is differentiated).
    projection
        The projection settings.

    Notes
    -----
    Layer ``l`` (in :attr:`InfluenceModel.closed_form_layers` order) is projected with matrices
    seeded by ``(projection.seed, l)``; two projectors with the same settings on models with the
    same watched layer shapes give the same projection.
    """

    def __init__(self, model: InfluenceModel, projection: Projection):
        if not isinstance(model, InfluenceModel):
            raise TypeError(f"model must be an InfluenceModel, got {type(model).__name__}.")
        if not isinstance(projection, Projection):
            raise TypeError(f"projection must be a Projection, got {type(projection).__name__}.")
        self.model = model
        self.projection = projection
        self.dtype = tf.float64 if model.dtype == tf.float64 else tf.float32
        self._factors: dict[int, tuple[tf.Tensor, tf.Tensor, int]] = {}
        self._cached: dict[int, tf.Tensor] = {}
        self._plan_cache: dict[int, tuple[int, int, int]] | None = None

    @property
    def dimension(self) -> int:
        """``k``, the number of coordinates of a projected gradient."""
        return int(self.projection.dimension)

    def _layer_rows(self, index: int) -> int:
        """``P_l``, the number of watched parameters of layer ``index``."""
        return sum(int(np.prod(w.shape)) for w in self.model._closed_form_weights[index])

    def _structured_shape(self, index: int) -> tuple[int, int] | None:
        """``(d_a, d_out)`` (kernel input size plus 1 for a watched bias, output size) if layer ``index``
        is projected structurally, else ``None``."""
        if not self.projection.structured or self.model._recorder is None:
            return None
        rule = self.model._recorder.rules[index]
        watched = self.model._watched_mask(index)
        if not isinstance(rule, (DenseRule, ConvRule)) or not watched[0]:
            return None
        kernel = self.model._recorder.parameters[index][0]
        return int(np.prod(kernel.shape[:-1])) + (1 if len(watched) > 1 and watched[1] else 0), int(kernel.shape[-1])

    def _plans(self) -> dict[int, tuple[int, int, int]]:
        """Per structured layer ``(k_a, k_δ, offset)``: a side whose Kronecker product with the other fits
        in ``k`` is kept exact; consecutive layers fill consecutive coordinates (mod ``k``)."""
        if self._plan_cache is None:
            plans, offset, k = {}, 0, self.dimension
            for index in range(len(self.model.closed_form_layers)):
                shape = self._structured_shape(index)
                if shape is None:
                    continue
                inputs, outputs = shape
                if inputs * outputs <= k:
                    sizes = (inputs, outputs)
                elif outputs * outputs <= k:
                    sizes = (k // outputs, outputs)
                elif inputs * inputs <= k:
                    sizes = (inputs, k // inputs)
                else:
                    sizes = (k // math.isqrt(k), math.isqrt(k))
                plans[index] = (*sizes, offset)
                offset = (offset + sizes[0] * sizes[1]) % k
            self._plan_cache = plans
        return self._plan_cache

    def _factor(self, index: int, part: int, rows: int, columns: int) -> tf.Tensor:
        """A random ``(rows, columns)`` factor, or random signs on the diagonal when ``columns == rows``
        (exact: ``R Rᵀ = I``)."""
        if columns == rows:
            signs = random_matrix(self.projection.seed, _salt(index, part), rows, 1, "rademacher")
            return tf.linalg.diag(signs[:, 0])
        return random_matrix(self.projection.seed, _salt(index, part), rows, columns, self.projection.kind)

    def factors(self, index: int) -> tuple[tf.Tensor, tf.Tensor, int]:
        """``(R_a, R_δ, offset)`` of structured layer ``index``: ``R_a (d_a, k_a)``, ``R_δ (d_out, k_δ)``
        (a square factor is a diagonal of random signs: that side is not compressed). The layer's
        projection matrix is ``R_a ⊗ R_δ`` (rows in the order of its flat gradient) with its
        ``k_a k_δ`` columns placed at coordinates ``offset, offset + 1, …`` (mod ``k``)."""
        if index not in self._factors:
            shape = self._structured_shape(index)
            if shape is None:
                raise ValueError(f"Layer {index} is not projected structurally.")
            k_a, k_out, offset = self._plans()[index]
            with tf.init_scope():
                self._factors[index] = (
                    tf.cast(self._factor(index, _PART_INPUT, shape[0], k_a), self.dtype),
                    tf.cast(self._factor(index, _PART_OUTPUT, shape[1], k_out), self.dtype),
                    offset,
                )
        return self._factors[index]

    def layer_matrix(self, index: int) -> tf.Tensor:
        """The whole ``(P_l, k)`` projection matrix of layer ``index`` (small layers and tests only)."""
        shape = self._structured_shape(index)
        if shape is None:
            rows = self._layer_rows(index)
            return dense_matrix(self.projection, index, rows)
        input_factor, output_factor, offset = self.factors(index)
        kron = tf.reshape(input_factor[:, None, :, None] * output_factor[None, :, None, :],
                          [shape[0] * shape[1], -1])
        return self._place(kron, offset)

    def _place(self, features: tf.Tensor, offset: int) -> tf.Tensor:
        """Columns of ``features`` at coordinates ``offset, offset + 1, …`` (mod k) of a k-vector."""
        padded = tf.pad(features, [[0, 0], [0, self.dimension - features.shape[1]]])
        return tf.roll(padded, shift=offset, axis=1) if offset else padded

    def _structured(self, index: int, calls: list[LayerCall]) -> tf.Tensor:
        layer, rule = self.model.closed_form_layers[index], self.model._recorder.rules[index]
        input_factor, output_factor, offset = self.factors(index)
        kernel = self.model._recorder.parameters[index][0]
        kernel_rows = int(np.prod(kernel.shape[:-1]))
        projected_kernel = tf.reshape(input_factor[:kernel_rows], [*kernel.shape[:-1], input_factor.shape[1]])
        projected_bias = input_factor[kernel_rows] if input_factor.shape[0] > kernel_rows else None
        total = 0.0
        for call in calls:
            inputs = rule.preactivation(layer, tf.cast(call.inputs, self.dtype), [projected_kernel, projected_bias])
            inputs = tf.reshape(inputs, [tf.shape(inputs)[0], -1, inputs.shape[-1]])
            delta = tf.reshape(tf.cast(call.delta, self.dtype), [tf.shape(call.delta)[0], -1, call.delta.shape[-1]])
            total += tf.einsum("bta,btd->bad", inputs, tf.matmul(delta, output_factor))
        return self._place(tf.reshape(total, [-1, input_factor.shape[1] * output_factor.shape[1]]), offset)

    def _dense(self, index: int, gradients: tf.Tensor) -> tf.Tensor:
        rows = self._layer_rows(index)
        gradients = tf.reshape(gradients, [-1, rows])
        if rows * self.dimension * 4 <= self.projection.max_cached_bytes:
            if index not in self._cached:
                with tf.init_scope():
                    self._cached[index] = tf.cast(dense_matrix(self.projection, index, rows), self.dtype)
            return tf.matmul(tf.cast(gradients, self.dtype), self._cached[index])
        return project_dense(tf.cast(gradients, self.dtype), self.projection, index)

    @compiled_method
    def project_tensor(self, batch: Batch) -> tf.Tensor:
        """Projected per-sample gradients of one batch, shape ``(batch, k)``: float64 for a float64 model,
        else float32."""
        record = self.model._record(batch)
        if record is None:
            blocks = self.model._jacobian_blocks(batch)
            return tf.add_n([self._dense(index, block) for index, block in enumerate(blocks)])
        parts = []
        for index, calls in enumerate(record.calls):
            if self._structured_shape(index) is not None:
                parts.append(self._structured(index, calls))
            else:
                parts.append(self._dense(index, self.model._summed_flat_gradients(index, calls)))
        return tf.add_n(parts)
