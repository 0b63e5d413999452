"""The mean Hessian of the training loss as a matrix-free linear operator.

.. math::  H = \\frac{1}{n} \\sum_{i=1}^{n} w_i \\nabla^2_\\theta \\ell(z_i; \\theta)

over the watched weights θ and a dataset of n samples (``w_i`` are sample weights, 1 by default).
Products ``H V`` are computed batch by batch from Hessian-vector products of the summed loss (or
Gauss-Newton-vector products, ``curvature='ggn'``), so memory is bounded by one batch times the
number of vectors; per-sample Hessians never exist. The dense matrix comes from blocks of those
products (:meth:`HessianOperator.dense`) or, for a Dense output layer on fixed inputs under
softmax / sigmoid cross-entropy or mean squared error, in closed form (:func:`gauss_newton_hessian`).
"""
import keras
import numpy as np
import tensorflow as tf

from ..common.compiled import compiled_method
from ..common.datasets import batch_size_of, iterate_batches
from ..common.distribute import SAME_DATA, SAME_WEIGHTS, data_parallel
from ..common.errors import NonFiniteError
from ..common.progress import known_cardinality, progress
from ..model.influence_model import InfluenceModel
from ..model.layer_rules import DenseRule
from .gauss_newton import GaussNewtonProduct, ggn_is_default

CURVATURES = ("auto", "hessian", "ggn")
# Elements of the (rows, F·C) right operand of the closed-form Gauss-Newton products (256 MiB in float64).
_KRONECKER_CHUNK_ELEMENTS = 2**25


def resolve_curvature(model: InfluenceModel, curvature: str) -> str:
    """``'hessian'`` or ``'ggn'`` for a requested ``curvature`` (``'auto'``, ``'hessian'`` or ``'ggn'``).

    ``'auto'`` is the Gauss-Newton matrix (positive semi-definite for a convex loss, equal to the
    Hessian when the network output is linear in the watched weights) when the model has a single
    output tensor and a built-in Keras loss (cross-entropies, mean squared or absolute error,
    Huber, log-cosh), else the Hessian: a custom loss callable may depend on the weights other
    than through the output (e.g. a weight penalty), whose curvature the GGN would drop. Every
    IHVP calculator uses ``'auto'`` by default: through hidden layers the Hessian is indefinite,
    which breaks conjugate gradient and LiSSA and makes influence estimates sign-unstable (Bae et
    al., "If Influence Functions are the Answer, Then What is the Question?", NeurIPS 2022).
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}.")
    if curvature == "auto":
        return "ggn" if ggn_is_default(model) else "hessian"
    return curvature


def check_workers_agree(parallel, model: InfluenceModel, dataset: tf.data.Dataset) -> None:
    """On a multi-worker cluster, refuse workers holding different weights or iterating different data."""
    if parallel.multi_worker:
        first = next(iter(dataset))
        parallel.check_identical(model.weights, "The watched weights", SAME_WEIGHTS)
        parallel.check_identical(first, "The first batches of the Hessian dataset", SAME_DATA)


class HessianOperator:
    """``V ↦ H V`` for the mean Hessian ``H`` of ``model``'s loss over ``dataset``.

    Parameters
    ----------
    model
        The InfluenceModel whose watched weights define the Hessian.
    dataset
        Batched dataset of the samples averaged in the Hessian.
    show_progress
        Show a progress bar on each pass over ``dataset``.
    curvature
        ``'hessian'`` (default): the Hessian of the loss; ``'ggn'``: the generalized Gauss-Newton
        matrix ``Jᵀ H_out J`` (:mod:`~influence_lib.curvature.gauss_newton`); ``'auto'``: see
        :func:`resolve_curvature`.

    Notes
    -----
    Each batch is split across the replicas of the ``tf.distribute`` strategy in use when the
    operator is built, and the replicas' sums are all-reduced (:mod:`influence_lib.common.distribute`).
    """

    def __init__(
        self,
        model: InfluenceModel,
        dataset: tf.data.Dataset,
        show_progress: bool = False,
        curvature: str = "hessian",
    ):
        model.check_dataset(dataset, "the Hessian dataset")
        self.model = model
        self.dataset = dataset
        self.show_progress = show_progress
        self.curvature = resolve_curvature(model, curvature)
        # (batch, V) ↦ the curvature of the batch's summed loss times each row of V.
        self.batch_product = (
            GaussNewtonProduct(model).batch_product if self.curvature == "ggn" else model.batch_hvp_tensor
        )
        self.parallel = data_parallel()
        check_workers_agree(self.parallel, model, dataset)

    def summed_product(self, batch, vectors: tf.Tensor) -> tf.Tensor:
        """The curvature of the batch's summed loss times each row of ``vectors``, summed over replicas."""
        return self.parallel.sum_rows(self.batch_product, batch, vectors)

    @property
    def dim(self) -> int:
        """Number of rows (and columns) of H: the number of watched parameters."""
        return self.model.nb_params

    def matmat(self, vectors: tf.Tensor) -> tf.Tensor:
        """``H`` applied to each row of ``vectors`` (shape ``(k, P)``); returns shape ``(k, P)``."""
        total = None
        count = 0
        batches = progress(
            iterate_batches(self.dataset, "the Hessian dataset"),
            self.show_progress,
            "Hessian-vector products",
            known_cardinality(self.dataset),
        )
        for batch in batches:
            product = self.summed_product(batch, vectors)
            total = product if total is None else total + product
            count += batch_size_of(batch)
        return total / tf.cast(count, total.dtype)

    def dense(self, chunk_size: int = 512) -> tf.Tensor:
        """The matrix ``H`` itself, shape ``(P, P)``, in one pass over the dataset.

        For the Hessian with ``P ≤ chunk_size`` each batch contributes the jacobian of its gradient
        (:meth:`InfluenceModel.batch_hessian_tensor`); otherwise each batch is multiplied by blocks
        of ``chunk_size`` identity rows (``⌈P / chunk_size⌉`` vectorized products per batch), so
        memory is O(P²) for the result plus one batch times ``chunk_size`` vectors.
        """
        dim = self.dim
        dtype = self.model.dtype
        blocks = [tf.one_hot(tf.range(start, min(start + chunk_size, dim)), dim, dtype=dtype)
                  for start in range(0, dim, chunk_size)]
        if dim <= chunk_size and self.curvature == "hessian":
            blocks = []
        total = np.zeros((dim, dim), dtype=dtype.as_numpy_dtype)
        count = 0
        batches = progress(
            iterate_batches(self.dataset, "the Hessian dataset"),
            self.show_progress,
            "Hessian",
            known_cardinality(self.dataset),
        )
        for batch in batches:
            if not blocks:
                total += self.parallel.sum_rows(self.model.batch_hessian_tensor, batch).numpy()
            row = 0
            for block in blocks:
                rows = int(block.shape[0])
                total[row : row + rows] += self.summed_product(batch, block).numpy()
                row += rows
            count += batch_size_of(batch)
        return _finite_symmetric(total / count)


def _finite_symmetric(hessian: np.ndarray) -> tf.Tensor:
    hessian = tf.constant(0.5 * (hessian + hessian.T))
    if not bool(tf.reduce_all(tf.math.is_finite(hessian))):
        raise NonFiniteError("The Hessian has NaN or infinite entries: check the model's loss on the data.")
    return hessian


_CLOSED_FORM_LOSSES = {
    keras.losses.CategoricalCrossentropy: keras.activations.softmax,
    keras.losses.SparseCategoricalCrossentropy: keras.activations.softmax,
    keras.losses.BinaryCrossentropy: keras.activations.sigmoid,
    keras.losses.MeanSquaredError: None,
}


def closed_form_refusal(model: InfluenceModel) -> str | None:
    """Why the closed-form Gauss-Newton Hessian is not exact for ``model`` (``None`` when it is).

    It is exact when the watched weights are one Dense layer that produces the model's single
    output — so its inputs do not depend on the watched weights and its logits are linear in
    them — under softmax cross-entropy (softmax activation, or linear with ``from_logits=True``),
    sigmoid binary cross-entropy (likewise) or mean squared error (linear activation).
    """
    layers = model.closed_form_layers
    if len(layers) != 1 or not DenseRule.supports(layers[0]):
        return f"the watched layers {[layer.name for layer in layers]} are not a single Dense layer"
    layer = layers[0]
    outputs = getattr(model.model, "outputs", None)
    if not outputs or len(outputs) != 1 or getattr(outputs[0], "_keras_history", None) is None:
        return "the model's single output cannot be identified (subclassed or multi-output model)"
    if outputs[0]._keras_history.operation is not layer:
        return f"layer {layer.name!r} is not the layer producing the model's output"
    loss = model.loss_function
    if type(loss) not in _CLOSED_FORM_LOSSES:
        names = ", ".join(kind.__name__ for kind in _CLOSED_FORM_LOSSES)
        return f"the loss is {type(loss).__name__}, not one of {names}"
    options = loss._fn_kwargs
    if options.get("axis", -1) != -1 or options.get("ignore_class") is not None:
        return "the loss must use axis=-1 and no ignore_class"
    link = _CLOSED_FORM_LOSSES[type(loss)]
    expected = keras.activations.linear if link is None or options.get("from_logits", False) else link
    if layer.activation is not expected:
        name = getattr(layer.activation, "__name__", layer.activation)
        return (
            f"layer {layer.name!r} has activation {name!r} but {type(loss).__name__} with "
            f"from_logits={bool(options.get('from_logits', False))} needs {expected.__name__!r}"
        )
    return None


def gauss_newton_hessian(model: InfluenceModel, dataset: tf.data.Dataset, show_progress: bool = False) -> tf.Tensor:
    r"""Mean Hessian of a Dense output layer on fixed inputs, in closed form (exact, not an approximation).

    For logits ``z = Wᵀa + b`` of each output row (sample, or position of a sequence), the
    logits are linear in ``(W, b)``, so the Hessian is the Gauss-Newton matrix

    .. math::  H = \frac{1}{n} \sum_{i} \sum_{t} (\tilde a_{i,t} \tilde a_{i,t}^\top) \otimes H_{i,t}

    with ``ã = [a; 1]`` when the bias is watched and ``H_{i,t} = ∂²ℓ_i/∂z_{i,t}²`` the loss
    Hessian in the logits (``s (diag p − p pᵀ)`` for softmax cross-entropy with label mass
    ``s``, ``diag p(1 − p) / C`` for sigmoid cross-entropy, ``(2 / C) I`` for mean squared
    error), sample weights and the mean over positions included, computed by automatic
    differentiation of the model's loss (Martens, "New insights and perspectives on the natural
    gradient method", JMLR 2020). One forward pass per batch, then matrix products over chunks of
    rows costing ``rows · F² · C (C + 1) / 2`` (the upper half, the rest by symmetry); no backward
    pass through the model, no per-sample Hessian.

    Raises
    ------
    ValueError
        If the closed form is not exact for the model (see :func:`closed_form_refusal`).
    """
    reason = closed_form_refusal(model)
    if reason is not None:
        raise ValueError(
            f"The closed-form Gauss-Newton Hessian is exact only for a single Dense output layer under softmax "
            f"or sigmoid cross-entropy or mean squared error; {reason}. Use the Hessian-vector products instead "
            "(ExactIHVP does so automatically)."
        )
    model.check_dataset(dataset, "the Hessian dataset")
    check_workers_agree(data_parallel(), model, dataset)
    layer = model.closed_form_layers[0]
    parameters = [p.value.ref() if p is not None else None for p in DenseRule.parameters(layer)]
    watched = tuple(p is not None and p in {w.ref() for w in model.tf_variables} for p in parameters)
    link = _CLOSED_FORM_LOSSES[type(model.loss_function)]
    if model.loss_function._fn_kwargs.get("from_logits", False):
        link = None
    rows = _ClosedFormRows(model, link, watched)
    classes = int(layer.units)
    total = _KroneckerSum(model.nb_params // classes, classes)
    count = 0
    batches = progress(
        iterate_batches(dataset, "the Hessian dataset"),
        show_progress,
        "Gauss-Newton Hessian",
        known_cardinality(dataset),
    )
    for batch in batches:
        calls = model.batch_layer_io_tensor(batch)[0]
        if len(calls) != 1:
            raise ValueError(
                f"The closed-form Gauss-Newton Hessian needs the watched Dense layer to be called once per forward "
                f"pass, it was called {len(calls)} times. Use ExactIHVP's Hessian-vector products instead."
            )
        total.add(*rows.rows(batch, *calls[0]))
        count += batch_size_of(batch)
    return tf.cast(_finite_symmetric(total.result() / count), model.dtype)


class _KroneckerSum:
    """``Σ_r (ã_r ã_rᵀ) ⊗ H_r`` over streamed output rows, float64, laid out ``(F, C, F, C)``.

    Rows are buffered until a chunk of ``budget / (F·C)`` rows (the size of one product's right
    operand) is reached, then multiplied in large products: memory is bounded by the budget and
    the ``P × P`` result, never by the dataset.
    """

    def __init__(self, size: int, classes: int, budget: int = _KRONECKER_CHUNK_ELEMENTS):
        self.total = np.zeros((size, classes, size, classes), dtype=np.float64)
        self.classes = classes
        self.chunk = max(1, budget // (size * classes))
        self.features, self.blocks, self.pending = [], [], 0

    @compiled_method
    def upper_class_blocks(self, features: tf.Tensor, blocks: tf.Tensor) -> list[tf.Tensor]:
        """``Σ_r ã_{r,i} ã_{r,j} H_r[c, d]`` for every class ``c`` and ``d ≥ c``: one ``(F, F, C − c)`` tensor per ``c``.

        ``C`` matrix products ``(F, R) × (R, F·(C − c))`` — half of the ``(F·C)²`` entries, the
        other half follows by symmetry.
        """
        rows, size = tf.shape(features)[0], tf.shape(features)[1]
        results = []
        for c in range(self.classes):
            right = tf.reshape(features[:, :, None] * blocks[:, c, None, c:], [rows, -1])
            results.append(tf.reshape(tf.matmul(features, right, transpose_a=True), [size, size, self.classes - c]))
        return results

    def add(self, features: tf.Tensor, blocks: tf.Tensor) -> None:
        self.features.append(features)
        self.blocks.append(blocks)
        self.pending += int(features.shape[0])
        if self.pending >= self.chunk:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        features, blocks = tf.concat(self.features, axis=0), tf.concat(self.blocks, axis=0)
        self.features, self.blocks, self.pending = [], [], 0
        for start in range(0, int(features.shape[0]), self.chunk):
            upper = self.upper_class_blocks(features[start : start + self.chunk], blocks[start : start + self.chunk])
            for c, block in enumerate(upper):
                self.total[:, c, :, c:] += block.numpy()

    def result(self) -> np.ndarray:
        """The ``(F·C, F·C)`` sum, its lower class-triangle filled by symmetry."""
        self._flush()
        classes = self.total.shape[1]
        for c in range(classes):
            for d in range(c):
                self.total[:, c, :, d] = self.total[:, d, :, c].T
        size = self.total.shape[0]
        return self.total.reshape(size * classes, size * classes)


class _ClosedFormRows:
    """Per output row of a batch: features ``ã`` (R, F) and loss Hessian blocks ``H_row`` (R, C, C), float64."""

    def __init__(self, model: InfluenceModel, link, watched: tuple[bool, bool]):
        self.product = GaussNewtonProduct(model)
        self.link = link
        self.watched = watched

    @compiled_method
    def rows(self, batch, inputs: tf.Tensor, logits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        blocks = tf.cast(self.product.output_hessian(batch, logits, self.link, convex=True), tf.float64)
        inputs = tf.reshape(tf.cast(inputs, tf.float64), [-1, inputs.shape[-1]])
        features = [inputs] if self.watched[0] else []
        if self.watched[1]:
            features.append(tf.ones_like(inputs[:, :1]))
        return tf.concat(features, axis=1), blocks
