"""Small Keras and ``tf.data`` helpers Influenciae users import from ``deel.influenciae.utils``."""
import keras
import numpy as np
import tensorflow as tf

from ..common.datasets import check_dataset
from ..model.layer_selection import _layer_index


def find_layer(model: keras.Model, layer: str | int) -> keras.layers.Layer:
    """The layer of ``model`` with this name or index (negative indices count from the end).

    Raises
    ------
    ValueError
        If there is no such layer (the message lists the model's layers).
    TypeError
        If ``layer`` is neither a string nor an integer.
    """
    return model.layers[_layer_index(model, layer, "layer")]


def is_dataset_batched(dataset: tf.data.Dataset) -> int | bool:
    """The batch size of a dataset made by ``.batch(n)``, or ``False`` if it is not batched.

    Read from the dataset's structure (no element is computed): the dataset itself or one of the
    datasets it is built from (``map``, ``prefetch``, ``cache``, ...) must be a batch dataset.
    """
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(f"dataset must be a tf.data.Dataset, got {type(dataset).__name__}.")
    pending = [dataset]
    while pending:
        current = pending.pop()
        batch_size = getattr(current, "_batch_size", None)
        if batch_size is not None:
            return int(tf.get_static_value(batch_size))
        if type(current).__name__ in ("_UnbatchDataset", "_RebatchDataset"):
            return False
        pending.extend(current._inputs())
    return False


def dataset_to_tensor(dataset: tf.data.Dataset):
    """Concatenate the batches of a batched dataset: one tensor, or a tuple of tensors for tuple elements.

    The whole dataset is held in memory.
    """
    check_dataset(dataset, "dataset")
    if is_dataset_batched(dataset) is False:
        raise ValueError("dataset looks unbatched (no .batch() in its pipeline): call dataset.batch(batch_size) first.")
    batches = list(dataset)
    return tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *batches)


def array_to_dataset(
    array, batch_size: int | None = None, shuffle: bool = False, buffer_size: int = 1000, seed: int | None = None
) -> tf.data.Dataset:
    """A dataset over the rows of an array, or of a tuple of arrays (e.g. ``(x, y)``), optionally
    shuffled (once per pass, seeded) and batched.

    NumPy float arrays keep their dtype (float64 stays float64).
    """
    arrays = array if isinstance(array, tuple) else (array,)
    if not arrays or len({len(part) for part in arrays}) != 1:
        raise ValueError(f"The arrays must have the same number of rows, got {[len(part) for part in arrays]}.")
    dataset = tf.data.Dataset.from_tensor_slices(array if isinstance(array, tuple) else np.asarray(array))
    if shuffle:
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"buffer_size must be a positive integer, got {buffer_size!r}.")
        dataset = dataset.shuffle(buffer_size, seed=seed)
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
        dataset = dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    return dataset


def split_model(model: keras.Model, target_layer: str | int) -> tuple[keras.Model, keras.Model]:
    """Cut a Sequential or Functional model at the input of ``target_layer``.

    Returns
    -------
    (features, head)
        ``features`` maps the model's inputs to the input of ``target_layer``; ``head`` maps that
        to the model's outputs; ``head(features(x)) == model(x)``. Both share the model's layers
        and weights (nothing is copied or modified).

    Raises
    ------
    ValueError
        If the model has no symbolic graph (a subclassed model), or the layer's input is reached
        by more than one path (the head would need other inputs too).
    """
    layer = find_layer(model, target_layer)
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError("split_model needs a Sequential or Functional model with keras.Input (not a subclassed one).")
    features = keras.Model(inputs=inputs[0] if len(inputs) == 1 else inputs, outputs=layer.input)
    cut = tf.nest.map_structure(lambda tensor: keras.Input(shape=tensor.shape[1:], dtype=tensor.dtype), layer.input)
    index = model.layers.index(layer)
    if not isinstance(model, keras.Sequential):
        try:
            head = keras.Model(inputs=cut, outputs=_replay(model, index, cut))
        except (ValueError, KeyError, AttributeError) as error:
            raise ValueError(
                f"Cannot cut the model at {layer.name!r}: the layers after it use tensors from before it. "
                "Cut at a layer every path goes through."
            ) from error
        return features, head
    outputs = cut
    for later in model.layers[index:]:
        outputs = later(outputs)
    return features, keras.Model(inputs=cut, outputs=outputs)


def _replay(model: keras.Model, index: int, cut) -> object:
    """Re-run the layers of a Functional model from layer ``index`` on new inputs ``cut``."""
    start = model.layers[index]
    computed = {id(start.input): cut}
    for node_layer in model.layers[index:]:
        arguments = tf.nest.map_structure(lambda tensor: computed[id(tensor)], node_layer.input)
        result = node_layer(arguments)
        for tensor, value in zip(tf.nest.flatten(node_layer.output), tf.nest.flatten(result)):
            computed[id(tensor)] = value
    outputs = model.outputs[0] if len(model.outputs) == 1 else model.outputs
    return tf.nest.map_structure(lambda tensor: computed[id(tensor)], outputs)
