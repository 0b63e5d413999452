"""Resolve which layers (and so which weights) of a Keras model an influence method watches."""
from collections.abc import Callable, Sequence

import keras


def _layer_index(model: keras.Model, layer: str | int, argument: str) -> int:
    layers = model.layers
    if isinstance(layer, str):
        names = [candidate.name for candidate in layers]
        if layer not in names:
            raise ValueError(f"Unknown layer name {layer!r} for {argument}. The model's layers are: {names}.")
        return names.index(layer)
    if isinstance(layer, int) and not isinstance(layer, bool):
        if not -len(layers) <= layer < len(layers):
            raise ValueError(
                f"{argument}={layer} is out of range: the model has {len(layers)} layers "
                f"(valid indices {-len(layers)} to {len(layers) - 1})."
            )
        return layer % len(layers)
    raise TypeError(f"{argument} must be a layer name (str), a layer index (int) or None, got {layer!r}.")


def last_layer_with_weights(model: keras.Model) -> int:
    """Index of the last layer of ``model`` that has trainable weights."""
    for index in range(len(model.layers) - 1, -1, -1):
        if model.layers[index].trainable_weights:
            return index
    raise ValueError(
        "The model has no layer with trainable weights. Build the model (call it once on a batch "
        "or give it an Input) before wrapping it."
    )


def _listed_layers(model: keras.Model, layers: Sequence, last_layer) -> list[keras.layers.Layer]:
    if last_layer is not None:
        raise ValueError(
            "Give either a list of layers as start_layer (and last_layer=None) or a range start_layer..last_layer."
        )
    if not layers:
        raise ValueError("The list of layers to watch is empty: name at least one layer.")
    indices = []
    for layer in layers:
        if isinstance(layer, keras.layers.Layer):
            matches = [index for index, candidate in enumerate(model.layers) if candidate is layer]
            if not matches:
                names = [candidate.name for candidate in model.layers]
                raise ValueError(f"Layer {layer.name!r} is not one of the model's layers {names}.")
            indices.append(matches[0])
        else:
            indices.append(_layer_index(model, layer, "start_layer"))
    if len(set(indices)) != len(indices):
        raise ValueError(f"The list of layers to watch names a layer twice: {list(layers)}.")
    return [model.layers[index] for index in sorted(indices)]


def select_layers(
    model: keras.Model, start_layer: "str | int | Sequence | None", last_layer: str | int | None
) -> list[keras.layers.Layer]:
    """Layers from ``start_layer`` to ``last_layer`` (inclusive), or an explicit list of layers.

    ``start_layer=None`` selects the last layer with trainable weights; ``last_layer=None``
    selects ``start_layer`` alone. ``start_layer`` may also be a list of layer names, indices or
    layer objects (with ``last_layer=None``): exactly those layers, in the model's order — e.g. to
    skip a layer in the middle of a range.
    """
    if not model.layers:
        raise ValueError("The model has no layers; wrap a built Keras model.")
    if isinstance(start_layer, (list, tuple)):
        return _listed_layers(model, start_layer, last_layer)
    start = last_layer_with_weights(model) if start_layer is None else _layer_index(model, start_layer, "start_layer")
    last = start if last_layer is None else _layer_index(model, last_layer, "last_layer")
    if last < start:
        raise ValueError(
            f"last_layer ({model.layers[last].name!r}, index {last}) comes before start_layer "
            f"({model.layers[start].name!r}, index {start}); swap them."
        )
    return model.layers[start : last + 1]


def closed_form_units(layer: keras.layers.Layer, has_rule: Callable[[keras.layers.Layer], bool]) -> list:
    """The layers whose per-sample gradients make up ``layer``'s: itself if it has a rule, else its
    sublayers (recursively) when their trainable weights, in order, are exactly ``layer``'s.

    This opens composite layers such as ``MultiHeadAttention`` (its query, key, value and output
    ``EinsumDense`` projections) or a nested model, so that their parts get closed forms.
    """
    if has_rule(layer):
        return [layer]
    children = [
        child for child in layer._flatten_layers(include_self=False, recursive=False) if child.trainable_weights
    ]
    if not children:
        return [layer]
    units = [unit for child in children for unit in closed_form_units(child, has_rule)]
    if [id(weight) for unit in units for weight in unit.trainable_weights] != [id(w) for w in layer.trainable_weights]:
        return [layer]
    return units
