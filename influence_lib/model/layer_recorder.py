"""Record, during one forward pass, each watched layer's input and pre-activation output.

The ``call`` of each watched layer *instance* is replaced, for the duration of a ``with``
block, by a function computing the same output from the layer's own parameters through the
matching :class:`~influence_lib.model.layer_rules.LayerRule`; the pre-activation output is cast
to the computation dtype (float64 for a float64 model, float32 otherwise) and watched by the
tape, so one backward pass of the summed loss yields every output gradient ``δ``. The instances
are restored when the block exits, even on error, and the user's model is never left modified. A lock serializes recordings across threads; a recording
nested in another one (same thread) takes precedence over it, and the outer one then reports
its layers as not called.

The recording is *trusted* only if every watched layer was called through ``call`` with one
plain tensor and no watched weight was read anywhere else during the forward pass (e.g. weight
tying, or a subclassed model using ``layer.kernel`` directly); otherwise :attr:`failure` says
why and the caller falls back to the generic jacobian.
"""
import contextlib
import threading
from collections.abc import Iterator, Sequence

import keras
import tensorflow as tf

from .layer_rules import LayerCall, LayerRule

_LOCK = threading.RLock()
_MISSING = object()
_FORWARDED_KEYWORDS = {"training"}


class Recording:
    """The outcome of one recorded forward pass.

    Attributes
    ----------
    calls
        Per watched layer, the list of its calls (one per use of the layer in the forward pass).
    failure
        ``None`` if the closed form applies, else why it does not.
    """

    def __init__(self, nb_layers: int):
        self.calls: list[list[LayerCall]] = [[] for _ in range(nb_layers)]
        self.failure: str | None = None


class LayerRecorder:
    """Records the calls of ``layers`` (each with its ``rule`` and parameter variables).

    Parameters
    ----------
    layers
        The watched layers that own watched weights.
    rules
        One rule per layer.
    parameters
        Per layer, its parameter variables (``tf.Variable`` or ``None``) in the rule's order.
    dtype
        The dtype of the recorded pre-activations, hence of the output gradients ``δ`` and of
        the per-sample gradients (float32 or float64).
    """

    def __init__(
        self,
        layers: Sequence[keras.layers.Layer],
        rules: Sequence[LayerRule],
        parameters: Sequence[list],
        dtype: tf.DType = tf.float32,
    ):
        self.layers = list(layers)
        self.rules = list(rules)
        self.parameters = [list(params) for params in parameters]
        self.dtype = tf.as_dtype(dtype)

    def _wrap(self, index: int, original, tape: tf.GradientTape, record: Recording):
        layer, rule, params = self.layers[index], self.rules[index], self.parameters[index]

        def recording_call(inputs, *args, **kwargs):
            given = {key for key, value in kwargs.items() if value is not None}
            if args or given - _FORWARDED_KEYWORDS or not isinstance(inputs, tf.Tensor) or isinstance(
                inputs, (tf.SparseTensor, tf.RaggedTensor)
            ):
                record.failure = f"layer {layer.name!r} was called with arguments the closed form does not cover"
                return original(inputs, *args, **kwargs)
            with tape.stop_recording():
                values = [None if p is None else tf.cast(tf.convert_to_tensor(p), layer.compute_dtype) for p in params]
            preactivation = rule.preactivation(layer, inputs, values)
            watched = tf.cast(preactivation, self.dtype)
            tape.watch(watched)
            record.calls[index].append(LayerCall(inputs=inputs, preactivation=watched))
            return rule.activate(layer, tf.cast(watched, preactivation.dtype))

        return recording_call

    @contextlib.contextmanager
    def recording(self, tape: tf.GradientTape) -> Iterator[Recording]:
        """Within the block, calls of the watched layers are recorded into the yielded :class:`Recording`.

        ``tape`` must be recording with ``watch_accessed_variables=True``: the variables it saw
        are checked on exit for watched weights read outside their layer's call.
        """
        with _LOCK:
            record = Recording(len(self.layers))
            installed = []
            try:
                for index, layer in enumerate(self.layers):
                    previous = layer.__dict__.get("call", _MISSING)
                    object.__setattr__(layer, "call", self._wrap(index, layer.call, tape, record))
                    installed.append((layer, previous))
                yield record
            finally:
                for layer, previous in reversed(installed):
                    if previous is _MISSING:
                        object.__delattr__(layer, "call")
                    else:
                        object.__setattr__(layer, "call", previous)
            self._check(tape, record)

    def _check(self, tape: tf.GradientTape, record: Recording) -> None:
        if record.failure is not None:
            return
        uncalled = [layer.name for layer, calls in zip(self.layers, record.calls) if not calls]
        if uncalled:
            record.failure = f"layers {uncalled} were not called through their call() method"
            return
        watched = {param.ref() for params in self.parameters for param in params if param is not None}
        read_elsewhere = [v.name for v in tape.watched_variables() if v.ref() in watched]
        if read_elsewhere:
            record.failure = f"watched weights {read_elsewhere} were used outside their layer's call()"
