"""InfluenceModel: a Keras model, the weights an influence method watches, and its per-sample loss.

It provides, for a batch, per-sample losses, per-sample gradients, their dot products and
norms, the gradient of the summed loss, Hessian-vector products and the Hessian of the summed
loss.

Per-sample gradients of the layer types in :mod:`influence_lib.model.layer_rules` (Dense,
Conv1D/Conv2D, DepthwiseConv2D, SeparableConv2D, Embedding, EinsumDense, BatchNormalization,
LayerNormalization; composite layers such as MultiHeadAttention through their parts) come in
closed form from ONE forward and ONE backward pass of the batch: each watched layer's input ``a`` and output gradient ``δ`` are recorded
(:mod:`influence_lib.model.layer_recorder`) and combined per sample (``a_i ⊗ δ_i`` for Dense).
Anything else — another layer type, a subclassed model that uses weights outside its layers'
``call`` — automatically uses the vectorized jacobian (``GradientTape.jacobian`` with pfor).
"""
import copy
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from ..common.compiled import compiled_method
from ..common.datasets import Batch, check_dataset, iterate_batches
from .checks import check_per_sample_loss, check_targets
from .layer_recorder import LayerRecorder, Recording
from .layer_rules import LayerCall, rule_for
from .layer_selection import closed_form_units, select_layers
from .losses import LossPath, check_batch_fits, plan_loss_path, resolve_loss
from .measurement import Measurement, MeasurementAsLoss, margin, resolve_measurement

ProcessBatch = Callable[[Batch], tuple[object, tf.Tensor, tf.Tensor | None]]
_LOW_PRECISION = (tf.float16, tf.bfloat16)
_COMPUTE_DTYPES = (tf.float32, tf.float64)
_PER_SAMPLE_GRADIENT_MODES = ("auto", "jacobian")


def default_process_batch(batch: Batch) -> tuple[object, tf.Tensor, tf.Tensor | None]:
    """Split a batch ``(inputs, targets)`` or ``(inputs, targets, sample_weight)``."""
    if len(batch) == 2:
        return batch[0], batch[1], None
    if len(batch) == 3:
        return batch[0], batch[1], batch[2]
    raise ValueError(
        f"A batch must be (inputs, targets) or (inputs, targets, sample_weight); got a tuple of {len(batch)}. "
        "For other layouts pass process_batch_for_loss_fn=... returning (inputs, targets, sample_weight)."
    )


def _as_tf_variable(weight) -> tf.Variable:
    return weight.value if isinstance(weight, keras.Variable) else weight


def compute_dtype_of(weights: Sequence) -> tf.DType:
    """The dtype influence computations use for these weights: float64 if any is float64, else float32.

    float16 and bfloat16 weights (and mixed precision) are computed in float32.
    """
    dtypes = {tf.as_dtype(weight.dtype) for weight in weights}
    return tf.float64 if tf.float64 in dtypes else tf.float32


def loss_in_dtype(loss_function: Callable, dtype: tf.DType) -> Callable:
    """``loss_function`` computing in ``dtype``: a Keras loss casts its inputs to its own dtype
    (``floatx``, float32 by default), so a float64 model gets a float64 copy of it. The user's
    loss object is never modified."""
    if not isinstance(loss_function, keras.losses.Loss) or tf.as_dtype(loss_function.dtype) == dtype:
        return loss_function
    converted = copy.copy(loss_function)
    converted._dtype_policy = keras.DTypePolicy(dtype.name)
    converted._dtype = dtype.name
    return converted


def _owned_weights(layer: keras.layers.Layer, refs: set) -> list:
    """The weights of ``layer`` whose backing variables are in ``refs``, in ``layer.weights`` order."""
    return [weight for weight in layer.weights if _as_tf_variable(weight).ref() in refs]


def _weights_by_layer(model: keras.Model, weights_to_watch: Sequence) -> tuple[list, list[list]]:
    """Group explicit weights by the top-level layer of ``model`` that owns them, in the model's order."""
    flat = []
    for item in weights_to_watch:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    if not flat:
        raise ValueError("weights_to_watch is empty: pass a list of the model's weights (e.g. layer.weights).")
    wanted = {}
    for weight in flat:
        if not isinstance(weight, (keras.Variable, tf.Variable)):
            raise TypeError(
                f"weights_to_watch must hold the model's variables (e.g. model.layers[-1].weights), got "
                f"{type(weight).__name__}."
            )
        wanted.setdefault(_as_tf_variable(weight).ref(), weight)
    layers, per_layer, found = [], [], set()
    for layer in model.layers:
        refs = [_as_tf_variable(w).ref() for w in layer.weights]
        owned = [w for w, ref in zip(layer.weights, refs) if ref in wanted and ref not in found]
        if owned:
            found.update(_as_tf_variable(w).ref() for w in owned)
            layers.append(layer)
            per_layer.append(owned)
    missing = [getattr(wanted[ref], "path", getattr(wanted[ref], "name", "?")) for ref in wanted if ref not in found]
    if missing:
        raise ValueError(f"weights_to_watch holds weights that are not in the model's layers: {missing}.")
    return layers, per_layer


class InfluenceModel:
    """A Keras 3 model wrapped for influence computations.

    Parameters
    ----------
    model
        A built Keras model (Sequential, Functional or subclassed).
    start_layer
        Name or index of the first layer whose trainable weights are watched. ``None`` (default)
        watches the last layer that has trainable weights. A list of names, indices or layers
        watches exactly those layers (``last_layer`` must then be ``None``); ``start_layer=0,
        last_layer=-1`` watches every layer.
    last_layer
        Name or index of the last watched layer (inclusive). ``None`` watches ``start_layer`` alone.
    loss_function
        Loss returning one value per sample: a Keras loss identifier (``'mse'``,
        ``'sparse_categorical_crossentropy'``, a ``keras.losses`` function), a Keras loss created
        with ``reduction=None`` or any callable ``loss(y_true, y_pred) -> (batch,)``. Per-element
        losses of higher rank (e.g. per time step) are averaged over their non-batch axes.
        Default: the loss the model was compiled with (made unreduced); for a model never
        compiled, a cross-entropy matching its output layer (see :mod:`influence_lib.model.losses`).
        A cross-entropy on probabilities whose model ends in a ``softmax``/``sigmoid`` layer is
        computed from that layer's logits (same loss, exact gradients for confident samples).
    process_batch_for_loss_fn
        Maps a dataset batch to ``(inputs, targets, sample_weight or None)``. The default accepts
        ``(x, y)`` and ``(x, y, sample_weight)``.
    per_sample_gradients
        ``"auto"`` (default): closed-form per-sample gradients when every watched layer has a
        rule and the forward pass can be traced, the vectorized jacobian otherwise.
        ``"jacobian"``: always the vectorized jacobian.
    weights_to_watch
        Watch exactly these weights of the model (a list of variables, or of lists of variables
        such as ``[layer.weights for layer in ...]``) instead of ``start_layer``/``last_layer``.
        They are ordered as the model's layers and each layer's weights list them.

    Attributes
    ----------
    layers
        Every layer of the Keras model (``model.layers``), as in Influenciae.
    watched_layers
        The layers whose weights are watched, in model order.
    weights
        The watched Keras variables (``keras.Variable``, so ``weights == layer.weights`` holds for
        a fully watched layer), in flattening order.
    tf_variables
        The backing ``tf.Variable`` of each watched weight: what gradient tapes watch.
    dtype
        The computation and result dtype: float64 for a float64 model, float32 otherwise
        (float16, bfloat16 and mixed precision compute in float32).
    closed_form_layers
        The watched layers owning watched weights, in order (the blocks of
        :meth:`batch_jacobian_blocks`); composite layers such as ``MultiHeadAttention`` are
        replaced by their parts (its ``EinsumDense`` projections).
    fallback_reason
        Set at construction: ``None`` when the closed form will be used, otherwise why the
        jacobian will be used (a layer without rule, ``per_sample_gradients='jacobian'``). A
        forward pass that turns out not to be recordable (e.g. a watched weight used outside its
        layer) sets it when first traced. :attr:`per_sample_gradient_path` says it in words.

    Notes
    -----
    The model is always run in inference mode (``training=False``): dropout is off and
    BatchNormalization uses its moving statistics, so samples never mix within a batch (the
    closed form relies on this: the loss of sample ``i`` must depend on sample ``i`` only).
    Losses, gradients, Hessians and every influence value are computed in :attr:`dtype`: a
    float64 model stays float64 end to end (a Keras loss is run in float64 too), a float16 or
    bfloat16 one computes in float32.
    """

    def __init__(
        self,
        model: keras.Model,
        start_layer: str | int | None = None,
        last_layer: str | int | None = None,
        loss_function: Callable | None = None,
        process_batch_for_loss_fn: ProcessBatch = default_process_batch,
        per_sample_gradients: str = "auto",
        weights_to_watch: Sequence | None = None,
    ):
        if per_sample_gradients not in _PER_SAMPLE_GRADIENT_MODES:
            raise ValueError(
                f"per_sample_gradients must be one of {_PER_SAMPLE_GRADIENT_MODES}, got {per_sample_gradients!r}."
            )
        if not isinstance(model, keras.Model):
            raise TypeError(f"model must be a Keras 3 keras.Model, got {type(model).__name__}.")
        self.model = model
        self.loss_function = resolve_loss(loss_function, model)
        self._loss_path: LossPath = plan_loss_path(self.loss_function, model)
        self.process_batch_for_loss_fn = process_batch_for_loss_fn
        self.start_layer, self.last_layer = start_layer, last_layer
        if weights_to_watch is not None:
            if start_layer is not None or last_layer is not None:
                raise ValueError("Pass either weights_to_watch or start_layer/last_layer, not both.")
            self.watched_layers, per_layer = _weights_by_layer(model, weights_to_watch)
        else:
            self.watched_layers = select_layers(model, start_layer, last_layer)
            per_layer = [list(layer.trainable_weights) for layer in self.watched_layers]
        watched = [weight for weights in per_layer for weight in weights]
        if not watched:
            names = [layer.name for layer in self.watched_layers]
            raise ValueError(f"The selected layers {names} have no trainable weights; choose other layers.")
        self.layers: list[keras.layers.Layer] = model.layers
        self.weights: list[keras.Variable] = watched
        self.tf_variables: list[tf.Variable] = [_as_tf_variable(weight) for weight in watched]
        self.dtype: tf.DType = compute_dtype_of(watched)
        self.weight_shapes: list[tuple[int, ...]] = [tuple(weight.shape) for weight in watched]
        self.nb_params: int = int(sum(np.prod(shape, dtype=np.int64) for shape in self.weight_shapes))
        watched_refs = {variable.ref() for variable in self.tf_variables}
        self.closed_form_layers = [
            unit
            for layer in self.watched_layers
            if _owned_weights(layer, watched_refs)
            for unit in closed_form_units(layer, lambda candidate: rule_for(candidate) is not None)
            if _owned_weights(unit, watched_refs)
        ]
        self._closed_form_weights = [_owned_weights(layer, watched_refs) for layer in self.closed_form_layers]
        self._recorder, self._static_fallback = self._plan_closed_form(per_sample_gradients)
        self.fallback_reason: str | None = self._static_fallback

    @property
    def per_sample_gradient_path(self) -> str:
        """Which per-sample gradient computation is used, and why."""
        if self.fallback_reason is None:
            kinds = sorted({type(layer).__name__ for layer in self.closed_form_layers})
            return f"closed form from one forward and one backward pass (rules for {', '.join(kinds)})"
        return f"vectorized jacobian (memory grows with batch × parameters): {self.fallback_reason}"

    def _plan_closed_form(self, mode: str) -> tuple[LayerRecorder | None, str | None]:
        """Match each watched layer with its rule and its watched weights with the rule's parameters."""
        if mode == "jacobian":
            return None, "per_sample_gradients='jacobian' was requested"
        rules, parameters = [], []
        self._weight_positions: list[list[int]] = []
        for layer, layer_weights in zip(self.closed_form_layers, self._closed_form_weights):
            rule = rule_for(layer)
            if rule is None:
                return None, f"no closed-form rule for layer {layer.name!r} of type {type(layer).__name__}"
            params = [None if p is None else _as_tf_variable(p) for p in rule.parameters(layer)]
            refs = [None if p is None else p.ref() for p in params]
            positions = []
            for weight in layer_weights:
                ref = _as_tf_variable(weight).ref()
                if ref not in refs:
                    return None, f"weight {weight.name!r} of layer {layer.name!r} is not covered by its rule"
                positions.append(refs.index(ref))
            rules.append(rule)
            parameters.append(params)
            self._weight_positions.append(positions)
        return LayerRecorder(self.closed_form_layers, rules, parameters, self.dtype), None

    def with_measurement(self, measurement: "str | Measurement | None") -> "InfluenceModel":
        """The same model and watched weights, differentiating ``measurement`` instead of the loss.

        Parameters
        ----------
        measurement
            ``None`` or ``'loss'`` (returns ``self``), ``'margin'`` (classifier margin
            ``z_y − logsumexp_{k≠y} z_k``) or a callable ``(model_outputs, targets) -> (batch,)``;
            see :mod:`influence_lib.model.measurement`.

        Returns
        -------
        InfluenceModel
            A view sharing the Keras model and its weights whose per-sample "loss" is the
            measurement: its per-sample gradients are ``∇_θ m(t)`` (closed form where the loss's are).
        """
        function = resolve_measurement(measurement, self.loss_function)
        if function is None:
            return self
        view = copy.copy(self)
        for name, attribute in vars(type(self)).items():
            if isinstance(attribute, compiled_method):
                view.__dict__.pop(name, None)
        view.loss_function = MeasurementAsLoss(function)
        view._loss_path = LossPath(view.loss_function)
        if measurement == "margin" and self._loss_path.logits_layer is not None:
            on_logits = MeasurementAsLoss(lambda outputs, targets: margin(outputs, targets, from_logits=True))
            view._loss_path = LossPath(on_logits, self._loss_path.logits_layer)
        return view

    def __call__(self, inputs) -> tf.Tensor:
        """Run the wrapped model in inference mode."""
        return self.model(inputs, training=False)

    def check_dataset(self, dataset: tf.data.Dataset, name: str = "dataset") -> None:
        """Raise a clear error if ``dataset`` is not a non-empty batched dataset fitting the model."""
        check_dataset(dataset, name)
        inputs_spec = tf.nest.flatten(dataset.element_spec)[0]
        model_inputs = getattr(self.model, "inputs", None)
        if model_inputs:
            expected_rank = len(model_inputs[0].shape)
            if inputs_spec.shape.rank == expected_rank - 1:
                raise ValueError(
                    f"{name} looks unbatched: its inputs have shape {inputs_spec.shape} but the model expects "
                    f"a batch of shape {tuple(model_inputs[0].shape)}. Call {name}.batch(batch_size) first."
                )
            expected = tf.TensorShape([None, *model_inputs[0].shape[1:]])
            if len(model_inputs) == 1 and not expected.is_compatible_with(inputs_spec.shape):
                raise ValueError(
                    f"{name} has inputs of shape {inputs_spec.shape} but the model expects inputs of shape "
                    f"{tuple(model_inputs[0].shape)}: pass data of the shape the model was built for."
                )

    def flatten(self, tensors: Sequence[tf.Tensor], batch_dims: int = 0) -> tf.Tensor:
        """Concatenate per-weight tensors into flat vectors, keeping ``batch_dims`` leading axes."""
        if batch_dims == 0:
            return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)
        leading = tf.shape(tensors[0])[:batch_dims]
        return tf.concat([tf.reshape(t, tf.concat([leading, [-1]], 0)) for t in tensors], axis=batch_dims)

    def unflatten(self, vector: tf.Tensor) -> list[tf.Tensor]:
        """Split a flat vector of ``nb_params`` entries into tensors shaped like the watched weights."""
        sizes = [int(np.prod(shape, dtype=np.int64)) for shape in self.weight_shapes]
        return [tf.reshape(part, shape) for part, shape in zip(tf.split(vector, sizes), self.weight_shapes)]

    def _per_sample_loss(self, batch: Batch) -> tf.Tensor:
        inputs, targets, sample_weight = self.process_batch_for_loss_fn(batch)
        with self._loss_path.forward():
            outputs = self.model(inputs, training=False)
        outputs = tf.nest.map_structure(
            lambda out: tf.cast(out, self.dtype) if out.dtype in _LOW_PRECISION + _COMPUTE_DTYPES else out, outputs
        )
        check_batch_fits(self.loss_function, targets, outputs)
        targets = check_targets(targets, outputs)
        losses = loss_in_dtype(self._loss_path.loss, self.dtype)(targets, outputs)
        if losses.shape.rank == 0:
            raise ValueError(
                "The loss function returned a single value for the whole batch: it is reduced, or the "
                "dataset is unbatched. Use reduction=None and batch the dataset."
            )
        if losses.shape.rank > 1:
            losses = tf.reduce_mean(losses, axis=list(range(1, losses.shape.rank)))
        losses = check_per_sample_loss(losses, outputs, sample_weight)
        if sample_weight is not None:
            losses = losses * tf.cast(tf.reshape(sample_weight, [-1]), losses.dtype)
        return tf.cast(losses, self.dtype)

    @compiled_method
    def batch_loss_tensor(self, batch: Batch) -> tf.Tensor:
        """Per-sample losses of one batch, shape ``(batch,)`` (sample weights applied)."""
        return self._per_sample_loss(batch)

    def _record(self, batch: Batch) -> Recording | None:
        """One forward and one backward pass recording ``(a, δ)`` of every watched layer call.

        Returns ``None`` (and sets :attr:`fallback_reason`) when the closed form does not apply.
        """
        if self._recorder is None:
            self.fallback_reason = self._static_fallback
            return None
        with tf.GradientTape(watch_accessed_variables=True) as tape:
            with self._recorder.recording(tape) as record:
                losses = self._per_sample_loss(batch)
            loss = tf.reduce_sum(losses)
        if record.failure is not None:
            self.fallback_reason = record.failure
            return None
        calls = [call for layer_calls in record.calls for call in layer_calls]
        deltas = tape.gradient(
            loss, [call.preactivation for call in calls], unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        for call, delta in zip(calls, deltas):
            call.delta = delta
        self.fallback_reason = None
        return record

    def _watched_mask(self, layer_index: int) -> list[bool]:
        rule_params = self._recorder.parameters[layer_index]
        return [position in self._weight_positions[layer_index] for position in range(len(rule_params))]

    def _closed_form_blocks(self, record: Recording) -> list[tf.Tensor]:
        """Per-sample gradients of each watched layer, ``(B, P_l)``, columns in :attr:`weights` order."""
        blocks = []
        for index, (layer, calls) in enumerate(zip(self.closed_form_layers, record.calls)):
            positions = self._weight_positions[index]
            if positions == sorted(positions):
                block = self._summed_flat_gradients(index, calls)
            else:
                rule = self._recorder.rules[index]
                per_call = [rule.per_sample_gradients(layer, call) for call in calls]
                summed = [tf.add_n([parts[position] for parts in per_call]) for position in positions]
                block = tf.concat(self.flatten_per_weight(summed), axis=1)
            blocks.append(tf.cast(block, self.dtype))
        return blocks

    def _jacobian_blocks(self, batch: Batch) -> list[tf.Tensor]:
        """Per-layer blocks of the pfor jacobian (any model)."""
        gradients = self.flatten_per_weight(self._jacobian_weight_gradients(batch))
        blocks, start = [], 0
        for layer_weights in self._closed_form_weights:
            count = len(layer_weights)
            blocks.append(tf.concat(gradients[start : start + count], axis=1))
            start += count
        return blocks

    def _jacobian_weight_gradients(self, batch: Batch) -> list[tf.Tensor]:
        """Per-sample gradients by ``GradientTape.jacobian`` with pfor (works for any model)."""
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self.tf_variables)
            losses = self._per_sample_loss(batch)
        jacobians = tape.jacobian(
            losses, self.tf_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO, experimental_use_pfor=True
        )
        return [tf.cast(jacobian, self.dtype) for jacobian in jacobians]

    def _blocks(self, batch: Batch) -> list[tf.Tensor]:
        record = self._record(batch)
        return self._jacobian_blocks(batch) if record is None else self._closed_form_blocks(record)

    @compiled_method
    def batch_jacobian_tensor(self, batch: Batch) -> tf.Tensor:
        """Per-sample gradients of the loss w.r.t. the watched weights, shape ``(batch, nb_params)``.

        Closed form from one forward and one backward pass when every watched layer has a rule
        (``∂ℓ_i/∂W = Σ_t a_{i,t} ⊗ δ_{i,t}`` for Dense), else ``GradientTape.jacobian`` with
        pfor. Columns follow :attr:`weights`, each weight flattened row-major.
        """
        blocks = self._blocks(batch)
        return blocks[0] if len(blocks) == 1 else tf.concat(blocks, axis=1)

    @compiled_method
    def batch_jacobian_blocks(self, batch: Batch) -> list[tf.Tensor]:
        """Per-sample gradients split by watched layer: one ``(batch, P_l)`` tensor per layer of
        :attr:`closed_form_layers`; concatenated along axis 1 they equal :meth:`batch_jacobian_tensor`."""
        return self._blocks(batch)

    @staticmethod
    def flatten_per_weight(gradients: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """Reshape per-sample gradients ``(B, *shape)`` of each weight to ``(B, size)``."""
        return [tf.reshape(g, [tf.shape(g)[0], -1]) for g in gradients]

    @compiled_method
    def batch_gradient_dot_tensor(self, batch_a: Batch, batch_b: Batch) -> tf.Tensor:
        """Dot products of per-sample gradients ``⟨g_i, g_j⟩`` between two batches, shape ``(A, B)``.

        Summed over watched layers; for Dense layers without forming the gradients:
        ``⟨g_i, g_j⟩ = Σ_{t,s} (a_{i,t}·a_{j,s} + 1_bias)(δ_{i,t}·δ_{j,s})`` (Pruthi et al., 2020).
        """
        record_a, record_b = self._record(batch_a), self._record(batch_b)
        if record_a is None or record_b is None:
            return tf.matmul(self.batch_jacobian_tensor(batch_a), self.batch_jacobian_tensor(batch_b), transpose_b=True)
        grams = []
        for index, layer in enumerate(self.closed_form_layers):
            calls_a, calls_b = record_a.calls[index], record_b.calls[index]
            rule, watched = self._recorder.rules[index], self._watched_mask(index)
            if len(calls_a) == 1 and len(calls_b) == 1:
                grams.append(rule.gram(layer, calls_a[0], calls_b[0], watched))
            else:
                grams.append(tf.matmul(
                    self._summed_flat_gradients(index, calls_a), self._summed_flat_gradients(index, calls_b),
                    transpose_b=True,
                ))
        return tf.cast(tf.add_n(grams), self.dtype)

    def _summed_flat_gradients(self, index: int, calls: list[LayerCall]) -> tf.Tensor:
        layer, rule, watched = self.closed_form_layers[index], self._recorder.rules[index], self._watched_mask(index)
        return tf.add_n([rule.flat_gradients(layer, call, watched) for call in calls])

    @compiled_method
    def batch_gradient_norm_sq_tensor(self, batch: Batch) -> tf.Tensor:
        """Squared norms of the per-sample gradients ``‖g_i‖²``, shape ``(batch,)``.

        For Dense layers with 2-D inputs ``‖g_i‖² = (‖a_i‖² + 1_bias) ‖δ_i‖²`` without forming ``g_i``.
        """
        record = self._record(batch)
        if record is None:
            return tf.reduce_sum(tf.square(self.batch_jacobian_tensor(batch)), axis=1)
        norms = []
        for index, layer in enumerate(self.closed_form_layers):
            calls = record.calls[index]
            if len(calls) == 1:
                norms.append(self._recorder.rules[index].norm_sq(layer, calls[0], self._watched_mask(index)))
            else:
                norms.append(tf.reduce_sum(tf.square(self._summed_flat_gradients(index, calls)), axis=1))
        return tf.cast(tf.add_n(norms), self.dtype)

    @compiled_method
    def batch_layer_io_tensor(self, batch: Batch) -> list[list[tuple[tf.Tensor, tf.Tensor]]]:
        """Inputs and pre-activation outputs (in :attr:`dtype`) of every call of every watched layer.

        Returns, for each layer of :attr:`closed_form_layers`, a list with one ``(inputs,
        preactivation)`` pair per call in the forward pass (e.g. the logits of a final Dense
        layer with softmax activation). Raises ``ValueError`` if the layers cannot be recorded.
        """
        record = self._record(batch)
        if record is None:
            raise ValueError(f"The watched layers cannot be recorded: {self.fallback_reason}.")
        return [[(call.inputs, call.preactivation) for call in calls] for calls in record.calls]

    @compiled_method
    def batch_gradient_tensor(self, batch: Batch) -> tf.Tensor:
        """Gradient of the summed loss of one batch w.r.t. the watched weights, shape ``(nb_params,)``."""
        return self.summed_gradient(batch)

    def summed_gradient(self, batch: Batch) -> tf.Tensor:
        """Flat gradient of ``Σ_i ℓ_i`` over one batch, shape ``(nb_params,)``, run in the caller's context
        (not compiled) so that an outer ``GradientTape`` or ``ForwardAccumulator`` differentiates it again."""
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self.tf_variables)
            loss = tf.reduce_sum(self._per_sample_loss(batch))
        gradients = tape.gradient(loss, self.tf_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return self.flatten([tf.cast(gradient, self.dtype) for gradient in gradients])

    @compiled_method
    def batch_hvp_tensor(self, batch: Batch, vectors: tf.Tensor) -> tf.Tensor:
        """Hessian of the summed loss of one batch times each row of ``vectors``.

        Computes ``(Σ_i ∇²ℓ_i) v`` for every row ``v`` of ``vectors`` (shape ``(k, nb_params)``) by
        differentiating ``⟨∇ Σ_i ℓ_i, v⟩`` once more; no per-sample Hessian is ever formed.
        """
        with tf.GradientTape(watch_accessed_variables=False) as outer:
            outer.watch(self.tf_variables)
            gradient = self.summed_gradient(batch)
            projections = tf.linalg.matvec(tf.cast(vectors, gradient.dtype), gradient)
        hvps = outer.jacobian(
            projections,
            self.tf_variables,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
            experimental_use_pfor=True,
        )
        return self.flatten([tf.cast(hvp, self.dtype) for hvp in hvps], batch_dims=1)

    @compiled_method
    def batch_hessian_tensor(self, batch: Batch) -> tf.Tensor:
        """Hessian of the summed loss of one batch, shape ``(nb_params, nb_params)``.

        The jacobian (pfor) of the batch gradient ``∇ Σ_i ℓ_i``: one vectorized pass, no
        per-sample Hessian. Memory O(P²) plus P gradient-sized temporaries.
        """
        with tf.GradientTape(watch_accessed_variables=False) as outer:
            outer.watch(self.tf_variables)
            gradient = self.summed_gradient(batch)
        hessian = outer.jacobian(
            gradient, self.tf_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO, experimental_use_pfor=True
        )
        return self.flatten([tf.cast(block, self.dtype) for block in hessian], batch_dims=1)

    def batch_loss(self, dataset: tf.data.Dataset) -> tf.Tensor:
        """Per-sample losses of a whole batched dataset, shape ``(n,)``."""
        self.check_dataset(dataset)
        return tf.concat([self.batch_loss_tensor(batch) for batch in iterate_batches(dataset)], axis=0)

    def batch_jacobian(self, dataset: tf.data.Dataset) -> tf.Tensor:
        """Per-sample gradients of a whole batched dataset, shape ``(n, nb_params)`` (held in memory)."""
        self.check_dataset(dataset)
        return tf.concat([self.batch_jacobian_tensor(batch) for batch in iterate_batches(dataset)], axis=0)

    def batch_gradient(self, dataset: tf.data.Dataset) -> tf.Tensor:
        """Gradient of the summed loss of each batch, shape ``(nb_batches, nb_params)``."""
        self.check_dataset(dataset)
        return tf.stack([self.batch_gradient_tensor(batch) for batch in iterate_batches(dataset)])


class BaseInfluenceModel(InfluenceModel):
    """Influenciae's ``BaseInfluenceModel``: an :class:`InfluenceModel` watching an explicit list of weights.

    Parameters
    ----------
    model
        A built Keras model.
    weights_to_watch
        The weights to watch: variables of the model's layers, flat or as a list of lists (e.g.
        ``[layer.weights for layer in model.layers[-2:]]``). ``None`` watches every trainable weight.
    loss_function, process_batch_for_loss_fn, per_sample_gradients
        As for :class:`InfluenceModel`.
    weights_processed
        Accepted for compatibility with Influenciae and ignored: flat and nested lists are both understood.
    """

    def __init__(
        self,
        model: keras.Model,
        weights_to_watch: Sequence | None = None,
        loss_function: Callable | None = None,
        process_batch_for_loss_fn: ProcessBatch = default_process_batch,
        weights_processed: bool = False,
        per_sample_gradients: str = "auto",
    ):
        if weights_to_watch is None:
            if not isinstance(model, keras.Model):
                raise TypeError(f"model must be a Keras 3 keras.Model, got {type(model).__name__}.")
            weights_to_watch = model.trainable_weights
        super().__init__(
            model,
            loss_function=loss_function,
            process_batch_for_loss_fn=process_batch_for_loss_fn,
            per_sample_gradients=per_sample_gradients,
            weights_to_watch=weights_to_watch,
        )
