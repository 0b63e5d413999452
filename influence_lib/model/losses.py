"""Which per-sample loss an :class:`~influence_lib.model.influence_model.InfluenceModel` differentiates.

The loss follows Keras's conventions:

* ``loss_function=None``: the loss the model was compiled with (``model.compile(loss=...)``),
  made unreduced; a model that was never compiled gets a cross-entropy matching its output
  layer — probabilities for a ``softmax`` output, logits for an output layer without activation,
  binary cross-entropy for a ``sigmoid`` output — and a model with one output per sample and no
  compiled loss is refused (a categorical cross-entropy of one class is 0 for every sample).
* A Keras loss identifier (``'mse'``, ``'sparse_categorical_crossentropy'``, a
  ``keras.losses`` function or class name) is turned into the matching Keras loss with
  ``reduction=None``, as ``model.compile`` would accept it.
* A cross-entropy that cannot fit the model's output — probabilities expected where the output
  layer produces logits, ``from_logits=True`` on a ``softmax``/``sigmoid`` output, a categorical
  cross-entropy of a single output — raises a ``ValueError`` that says so.

**Cross-entropy from the logits.** With a ``softmax`` (``sigmoid``) output layer and a
probability-space (binary) cross-entropy, the loss is computed from the output layer's
pre-activation logits by :class:`~influence_lib.model.logits_losses.LogitsCrossEntropy`, which is
mathematically the same loss. In float32 the probability-space form loses the gradient of
confident samples: ``1 − p_y`` rounds to 0 below about 6e-8 and Keras clips ``p`` to
``[1e-7, 1 − 1e-7]``, so the per-sample gradient's relative error grows from 1e-3 at
``1 − p_y ≈ 2e-5`` to 100 % (issue 18). From the logits every entry of the gradient is exact to
float32 rounding. During the forward pass the output layer's
activation is switched off (the instance attribute, restored on exit, as the layer recorder does
with ``call``); the model the user passed is never left modified.
"""
import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import keras

from .logits_losses import LogitsCrossEntropy

_LOCK = threading.RLock()
_CROSS_ENTROPIES = (
    keras.losses.CategoricalCrossentropy,
    keras.losses.SparseCategoricalCrossentropy,
    keras.losses.BinaryCrossentropy,
)
_CATEGORICAL = (keras.losses.CategoricalCrossentropy, keras.losses.SparseCategoricalCrossentropy)
_LOSS_CLASSES = (
    *_CROSS_ENTROPIES,
    keras.losses.MeanSquaredError,
    keras.losses.MeanAbsoluteError,
    keras.losses.MeanAbsolutePercentageError,
    keras.losses.MeanSquaredLogarithmicError,
    keras.losses.Huber,
    keras.losses.LogCosh,
    keras.losses.Hinge,
    keras.losses.SquaredHinge,
    keras.losses.CategoricalHinge,
    keras.losses.KLDivergence,
    keras.losses.Poisson,
)
_CLASS_OF_FUNCTION = {cls().fn: cls for cls in _LOSS_CLASSES}


def _activation_name(layer: keras.layers.Layer) -> str | None:
    activation = getattr(layer, "activation", None)
    if activation is None:
        return "linear" if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)) else None
    return getattr(activation, "__name__", None)


def output_layer(model: keras.Model) -> keras.layers.Layer | None:
    """The layer producing the single output of a Functional or Sequential model, else ``None``."""
    outputs = getattr(model, "outputs", None)
    if not outputs or len(outputs) != 1:
        return None
    history = getattr(outputs[0], "_keras_history", None)
    return None if history is None else history.operation


def output_activation(model: keras.Model) -> str | None:
    """Name of the output layer's activation (``'linear'`` for none), ``None`` when it cannot be seen."""
    layer = output_layer(model)
    return None if layer is None else _activation_name(layer)


def _output_size(model: keras.Model) -> int | None:
    outputs = getattr(model, "outputs", None)
    if not outputs or len(outputs) != 1 or not outputs[0].shape:
        return None
    return outputs[0].shape[-1]


def from_logits(loss: Callable) -> bool | None:
    """``from_logits`` of a Keras cross-entropy loss object; ``None`` for any other loss."""
    if not isinstance(loss, _CROSS_ENTROPIES):
        return None
    return bool(loss._fn_kwargs.get("from_logits", False))


def _unreduced_copy(loss: keras.losses.Loss) -> keras.losses.Loss:
    """The same Keras loss with ``reduction=None`` (``model.compile`` losses average the batch)."""
    return type(loss).from_config({**loss.get_config(), "reduction": None})


def _from_identifier(identifier) -> Callable:
    try:
        resolved = keras.losses.get(identifier)
    except ValueError as error:
        raise ValueError(
            f"Unknown loss identifier {identifier!r}: use a Keras loss name such as 'mse' or "
            "'sparse_categorical_crossentropy', a keras.losses object with reduction=None, or a callable "
            "loss(y_true, y_pred) -> (batch,)."
        ) from error
    if isinstance(resolved, keras.losses.Loss):
        return _unreduced_copy(resolved)
    cls = _CLASS_OF_FUNCTION.get(resolved)
    return resolved if cls is None else cls(reduction=None)


def _compiled_loss(model: keras.Model) -> Callable | None:
    if not getattr(model, "compiled", False) or getattr(model, "loss", None) is None:
        return None
    loss = model.loss
    if isinstance(loss, (dict, list, tuple)):
        raise ValueError(
            f"The model was compiled with one loss per output ({loss!r}); influence methods need one per-sample "
            "loss: pass loss_function=... (a callable loss(y_true, y_pred) -> (batch,) over the model's outputs)."
        )
    return _from_identifier(loss) if isinstance(loss, str) or not isinstance(loss, keras.losses.Loss) else (
        _unreduced_copy(loss)
    )


def _default_loss(model: keras.Model) -> Callable:
    """A cross-entropy matching the output layer (Influenciae's probability-space one when unseen)."""
    outputs = getattr(model, "outputs", None)
    if outputs and len(outputs) > 1:
        raise ValueError(
            f"The model has {len(outputs)} outputs and was not compiled with a loss: the default cross-entropy "
            "explains one output. Pass loss_function=... a callable loss(y_true, y_pred) -> (batch,) over the "
            "model's outputs (e.g. the sum of a per-output loss), or wrap the output to explain: "
            "keras.Model(model.inputs, model.outputs[i])."
        )
    activation, size = output_activation(model), _output_size(model)
    if activation == "sigmoid":
        return keras.losses.BinaryCrossentropy(reduction=None)
    if size == 1:
        raise ValueError(
            "The model has one output per sample and was not compiled with a loss, and the default categorical "
            "cross-entropy of a single output is 0 for every sample. Pass loss_function='mse' (regression), "
            "'binary_crossentropy' (binary classification), another loss, or compile the model with its loss."
        )
    return keras.losses.CategoricalCrossentropy(from_logits=activation == "linear", reduction=None)


def resolve_loss(loss_function, model: keras.Model) -> Callable:
    """The per-sample loss for ``loss_function`` as given to :class:`InfluenceModel` (see module doc).

    Raises
    ------
    ValueError
        If a Keras loss averages the batch (``reduction`` other than ``None``), an identifier is
        unknown, or the loss cannot fit the model's output (see :func:`check_loss_fits`).
    TypeError
        If ``loss_function`` is neither ``None``, a string nor callable.
    """
    if loss_function is None:
        loss = _compiled_loss(model)
        loss = _default_loss(model) if loss is None else loss
    elif isinstance(loss_function, str):
        loss = _from_identifier(loss_function)
    elif not callable(loss_function):
        raise TypeError(
            f"loss_function must be a Keras loss identifier (str), a keras.losses object or a callable "
            f"loss(y_true, y_pred) -> (batch,), got {type(loss_function).__name__}."
        )
    else:
        loss = _CLASS_OF_FUNCTION[loss_function](reduction=None) if loss_function in _CLASS_OF_FUNCTION else (
            loss_function
        )
        check_unreduced(loss)
    check_loss_fits(loss, model)
    return loss


def check_unreduced(loss_function: Callable) -> None:
    """Raise if a Keras loss object averages or sums the batch."""
    reduction = getattr(loss_function, "reduction", None)
    if reduction is not None and str(reduction).lower().split(".")[-1] != "none":
        raise ValueError(
            f"The loss function must return one value per sample, but it has reduction={reduction!r}. "
            "Create it with reduction=None, e.g. keras.losses.CategoricalCrossentropy(reduction=None)."
        )


def check_loss_fits(loss: Callable, model: keras.Model) -> None:
    """Refuse a cross-entropy whose convention contradicts the model's output layer.

    Checked where the output layer can be seen (Functional and Sequential models): a
    probability-space cross-entropy on an output layer without activation (logits), a
    ``from_logits=True`` one on a ``softmax``/``sigmoid`` output, and a categorical cross-entropy
    of a single output. :func:`check_output_size` repeats the last check on any model's outputs.
    """
    size = _output_size(model)
    if size is not None:
        check_output_size(loss, size)
    logits = from_logits(loss)
    if logits is None:
        return
    activation = output_activation(model)
    name = type(loss).__name__
    if logits and activation in ("softmax", "sigmoid"):
        raise ValueError(
            f"The loss {name} has from_logits=True but the model's output layer {output_layer(model).name!r} "
            f"applies {activation}: its outputs are probabilities. Use {name}(from_logits=False, reduction=None) "
            "(the library then computes it from the logits, exactly), or remove the output activation."
        )
    if not logits and activation == "linear":
        raise ValueError(
            f"The loss {name} expects probabilities (from_logits=False) but the model's output layer "
            f"{output_layer(model).name!r} has no activation: its outputs are logits. Use "
            f"{name}(from_logits=True, reduction=None)."
        )


def check_batch_fits(loss: Callable, targets, outputs) -> None:
    """Refuse, from static shapes, a categorical cross-entropy of a single output and integer
    labels given to :class:`keras.losses.CategoricalCrossentropy` (which wants one-hot targets)."""
    if not hasattr(outputs, "shape") or not hasattr(targets, "shape") or outputs.shape.rank is None:
        return
    check_output_size(loss, outputs.shape[-1])
    if not isinstance(loss, keras.losses.CategoricalCrossentropy) or targets.shape.rank is None:
        return
    integer = targets.dtype.is_integer or targets.shape.rank == outputs.shape.rank - 1 or (
        targets.shape.rank == outputs.shape.rank and targets.shape[-1] == 1 and (outputs.shape[-1] or 0) > 1
    )
    if integer:
        raise ValueError(
            f"The targets look like integer class labels (shape {targets.shape}, dtype {targets.dtype.name}) but the "
            f"loss is CategoricalCrossentropy, which needs one-hot targets of shape {outputs.shape}. Use "
            "loss_function='sparse_categorical_crossentropy' (or compile the model with it), or one-hot encode "
            "the labels."
        )


def check_output_size(loss: Callable, size: int | None) -> None:
    """Refuse a categorical cross-entropy of one output per sample (0 for every sample)."""
    if size == 1 and isinstance(loss, _CATEGORICAL):
        raise ValueError(
            f"The loss {type(loss).__name__} is a categorical cross-entropy but the model has one output per "
            "sample, so the loss (and every gradient and influence score) is 0. Use loss_function='mse' for "
            "regression or 'binary_crossentropy' for a binary classifier."
        )


@dataclass(frozen=True)
class LossPath:
    """How the per-sample loss is evaluated.

    Attributes
    ----------
    loss
        The loss applied to what the forward pass returns.
    logits_layer
        The output layer whose activation is switched off during the forward pass (so ``loss``
        receives logits), or ``None`` when the model runs unchanged.
    """

    loss: Callable
    logits_layer: keras.layers.Layer | None = None

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Within the block, the model returns what :attr:`loss` expects."""
        if self.logits_layer is None:
            yield
            return
        layer = self.logits_layer
        with _LOCK:
            previous = layer.__dict__.get("activation")
            object.__setattr__(layer, "activation", keras.activations.linear)
            try:
                yield
            finally:
                object.__setattr__(layer, "activation", previous)


def plan_loss_path(loss: Callable, model: keras.Model) -> LossPath:
    """The logits path for a probability-space cross-entropy on a matching output activation
    (:class:`~influence_lib.model.logits_losses.LogitsCrossEntropy`), else the plain one."""
    if from_logits(loss) is not False:
        return LossPath(loss)
    options = loss._fn_kwargs
    if options.get("axis", -1) != -1 or options.get("ignore_class") is not None:
        return LossPath(loss)
    binary = isinstance(loss, keras.losses.BinaryCrossentropy)
    layer = output_layer(model)
    if layer is None or _activation_name(layer) != ("sigmoid" if binary else "softmax"):
        return LossPath(loss)
    if "activation" not in layer.__dict__ or len(getattr(layer, "_inbound_nodes", [])) != 1:
        return LossPath(loss)  # an activation Keras does not read from the attribute, or a shared layer
    kind = "binary" if binary else "sparse" if isinstance(loss, keras.losses.SparseCategoricalCrossentropy) else (
        "categorical"
    )
    return LossPath(LogitsCrossEntropy(kind, options.get("label_smoothing", 0.0)), layer)
