"""Resolve which layers (and so which weights) of a Keras model an influence method watches."""
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
    if model.weights:
        raise ValueError(
            "Every weight of the model is frozen (trainable=False), so there is no weight to watch. Make the layers "
            "to explain trainable (e.g. model.layers[-1].trainable = True) before wrapping the model."
        )
    raise ValueError(
        "The model has no layer with trainable weights. Build the model (call it once on a batch "
        "or give it an Input) before wrapping it."
    )


def select_layers(
    model: keras.Model, start_layer: str | int | None, last_layer: str | int | None
) -> list[keras.layers.Layer]:
    """Layers from ``start_layer`` to ``last_layer`` (inclusive).

    ``start_layer=None`` selects the last layer with trainable weights; ``last_layer=None``
    selects ``start_layer`` alone.
    """
    if not model.layers:
        raise ValueError("The model has no layers; wrap a built Keras model.")
    start = last_layer_with_weights(model) if start_layer is None else _layer_index(model, start_layer, "start_layer")
    last = start if last_layer is None else _layer_index(model, last_layer, "last_layer")
    if last < start:
        raise ValueError(
            f"last_layer ({model.layers[last].name!r}, index {last}) comes before start_layer "
            f"({model.layers[start].name!r}, index {start}); swap them."
        )
    return model.layers[start : last + 1]
