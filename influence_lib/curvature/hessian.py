"""The mean Hessian of the training loss as a matrix-free linear operator.

.. math::  H = \\frac{1}{n} \\sum_{i=1}^{n} w_i \\nabla^2_\\theta \\ell(z_i; \\theta)

over the watched weights θ and a dataset of n samples (``w_i`` are sample weights, 1 by default).
Products ``H V`` are computed batch by batch from Hessian-vector products of the summed loss,
so memory is bounded by one batch times the number of vectors; per-sample Hessians never exist.
The dense matrix comes from the jacobian of each batch's gradient (:meth:`HessianOperator.dense`)
or, for a last Dense layer under softmax cross-entropy, in closed form
(:func:`gauss_newton_hessian`).
"""
import keras
import numpy as np
import tensorflow as tf

from ..common.datasets import batch_size_of, iterate_batches
from ..common.errors import NonFiniteError
from ..common.progress import known_cardinality, progress
from ..model.influence_model import InfluenceModel
from ..model.layer_rules import DenseRule
from .gauss_newton import GaussNewtonProduct, single_output_model

CURVATURES = ("auto", "hessian", "ggn")


def resolve_curvature(model: InfluenceModel, curvature: str) -> str:
    """``'hessian'`` or ``'ggn'`` for a requested ``curvature`` (``'auto'``, ``'hessian'`` or ``'ggn'``).

    ``'auto'`` is the Gauss-Newton matrix (positive semi-definite for a convex loss, equal to the
    Hessian when the network output is linear in the watched weights) whenever the model has a
    single output tensor, else the Hessian. Iterative solvers (conjugate gradient, LiSSA) and
    Arnoldi use ``'auto'`` by default: through hidden layers the Hessian is indefinite, which
    breaks conjugate gradient and LiSSA and makes influence estimates sign-unstable
    (Bae et al., "If Influence Functions are the Answer, Then What is the Question?", NeurIPS 2022).
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}.")
    if curvature == "auto":
        return "ggn" if single_output_model(model) else "hessian"
    return curvature


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
        self._batch_product = (
            GaussNewtonProduct(model).batch_product if self.curvature == "ggn" else model.batch_hvp_tensor
        )

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
            product = self._batch_product(batch, vectors)
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
        dtype = self.model.weights[0].dtype
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
                total += self.model.batch_hessian_tensor(batch).numpy()
            row = 0
            for block in blocks:
                rows = int(block.shape[0])
                total[row : row + rows] += self._batch_product(batch, block).numpy()
                row += rows
            count += batch_size_of(batch)
        return _finite_symmetric(total / count)


def _finite_symmetric(hessian: np.ndarray) -> tf.Tensor:
    hessian = tf.constant(0.5 * (hessian + hessian.T))
    if not bool(tf.reduce_all(tf.math.is_finite(hessian))):
        raise NonFiniteError("The Hessian has NaN or infinite entries: check the model's loss on the data.")
    return hessian


def _check_gauss_newton(model: InfluenceModel) -> tuple[bool, list[bool]]:
    """Check the Gauss-Newton closed form applies; return whether the loss takes sparse labels
    and which of (kernel, bias) are watched."""
    def refuse(reason: str) -> ValueError:
        return ValueError(
            f"hessian='gauss_newton' needs the watched weights to be exactly one final Dense layer "
            f"whose output feeds a softmax cross-entropy; {reason}. Use hessian='exact' instead."
        )

    if len(model.closed_form_layers) != 1 or not DenseRule.supports(model.closed_form_layers[0]):
        raise refuse(f"the watched layers are {[layer.name for layer in model.closed_form_layers]}")
    layer = model.closed_form_layers[0]
    outputs = getattr(model.model, "outputs", None)
    if not outputs or len(outputs) != 1 or getattr(outputs[0], "_keras_history", None) is None:
        raise refuse("the model's single output cannot be identified (subclassed or multi-output model)")
    if outputs[0]._keras_history.operation is not layer:
        raise refuse(f"layer {layer.name!r} is not the layer producing the model's output")
    loss = model.loss_function
    if not isinstance(loss, (keras.losses.CategoricalCrossentropy, keras.losses.SparseCategoricalCrossentropy)):
        raise refuse(f"the loss is {type(loss).__name__}, not (Sparse)CategoricalCrossentropy")
    options = loss._fn_kwargs
    if options.get("axis", -1) != -1 or options.get("ignore_class") is not None:
        raise refuse("the cross-entropy must use axis=-1 and no ignore_class")
    from_logits = bool(options.get("from_logits", False))
    expected = keras.activations.linear if from_logits else keras.activations.softmax
    if layer.activation is not expected:
        raise refuse(
            f"layer {layer.name!r} has activation {getattr(layer.activation, '__name__', layer.activation)!r} "
            f"but the loss has from_logits={from_logits} (needs {'linear' if from_logits else 'softmax'})"
        )
    parameters = [p.value.ref() if p is not None else None for p in DenseRule.parameters(layer)]
    watched = [p is not None and p in {w.ref() for w in model.weights} for p in parameters]
    return isinstance(loss, keras.losses.SparseCategoricalCrossentropy), watched


def gauss_newton_hessian(model: InfluenceModel, dataset: tf.data.Dataset, show_progress: bool = False) -> tf.Tensor:
    r"""Mean Hessian of a last Dense layer under softmax cross-entropy, in closed form.

    For logits ``z = Wᵀa + b`` and ``p = softmax(z)``, the Hessian of the cross-entropy w.r.t.
    the logits is ``s (diag(p) − p pᵀ)`` with ``s = Σ_k y_k`` (1 for one-hot or smoothed
    labels), and ``z`` is linear in ``(W, b)``, so the Gauss-Newton matrix is the exact Hessian:

    .. math::  H = \frac{1}{n} \sum_i \frac{w_i}{T} \sum_t s_{i,t}\,
               (\tilde a_{i,t} \tilde a_{i,t}^\top) \otimes (\mathrm{diag}(p_{i,t}) - p_{i,t} p_{i,t}^\top)

    with ``ã = [a; 1]`` when the bias is watched, ``T`` the number of positions of a sequence
    output (1 for flat outputs) and ``w_i`` the sample weights (Martens, "New insights and
    perspectives on the natural gradient method", JMLR 2020). One forward pass per batch; no
    backward pass, no per-sample Hessian.

    Raises
    ------
    ValueError
        If the watched weights are not a single Dense layer producing the model's output under
        (sparse) categorical cross-entropy with the matching softmax/logits convention.
    """
    sparse, watched = _check_gauss_newton(model)
    model.check_dataset(dataset, "the Hessian dataset")
    dim = model.nb_params
    total = np.zeros((dim, dim), dtype=np.float64)
    count = 0
    batches = progress(
        iterate_batches(dataset, "the Hessian dataset"),
        show_progress,
        "Gauss-Newton Hessian",
        known_cardinality(dataset),
    )
    for batch in batches:
        total += _gauss_newton_batch(model, batch, sparse, tuple(watched)).numpy()
        count += batch_size_of(batch)
    return tf.cast(_finite_symmetric(total / count), model.weights[0].dtype)


def _gauss_newton_batch(model: InfluenceModel, batch, sparse: bool, watched: tuple[bool, bool]) -> tf.Tensor:
    """Sum over the batch of the per-sample Gauss-Newton blocks (float64)."""
    calls = model.batch_layer_io_tensor(batch)[0]
    if len(calls) != 1:
        raise ValueError(
            f"hessian='gauss_newton' needs the watched Dense layer to be called once per forward pass, "
            f"it was called {len(calls)} times. Use hessian='exact' instead."
        )
    inputs, logits = calls[0]
    _, targets, sample_weight = model.process_batch_for_loss_fn(batch)
    inputs, logits = tf.cast(inputs, tf.float64), tf.cast(logits, tf.float64)
    classes = logits.shape[-1]
    steps = tf.size(logits) // (tf.shape(logits)[0] * classes)
    probabilities = tf.reshape(tf.nn.softmax(logits), [-1, classes])
    features = [tf.reshape(inputs, [-1, inputs.shape[-1]])] if watched[0] else []
    if watched[1]:
        features.append(tf.ones_like(probabilities[:, :1]))
    features = tf.concat(features, axis=1)
    if sparse:
        label_mass = tf.ones_like(probabilities[:, 0])
    else:
        label_mass = tf.reshape(tf.reduce_sum(tf.cast(targets, tf.float64), axis=-1), [-1])
    weights = label_mass / tf.cast(steps, tf.float64)
    if sample_weight is not None:
        weights *= tf.repeat(tf.cast(tf.reshape(sample_weight, [-1]), tf.float64), steps)
    diagonal = tf.einsum("n,ni,nj,nk->ikj", weights, features, features, probabilities)
    dim = features.shape[1] * classes
    diagonal_part = tf.reshape(
        tf.einsum("ikj,kl->ikjl", diagonal, tf.eye(classes, dtype=tf.float64)), [dim, dim]
    )
    outer = tf.reshape(features[:, :, None] * probabilities[:, None, :], [-1, dim])
    return diagonal_part - tf.matmul(outer, weights[:, None] * outer, transpose_a=True)
