"""What a calculator's influence vectors depend on, collected generically for the disk-cache fingerprint.

A calculator's influence vectors are a function of (1) its settings, (2) the weights of every
Keras model it uses (all weights, not only the watched ones: earlier layers shape the features
and gradients), (3) the state it fitted (inverse Hessian, eigenvectors, factors, projections,
...) and (4) the training data. :func:`calculator_state` collects (1)–(3) by walking the
calculator's attributes, so a new calculator is covered without code of its own:

* public scalar attributes (numbers, strings, booleans, dtypes, lists of them) of the calculator
  and of every library object it holds (e.g. ``ihvp_calculator.damping``) become settings, keyed
  by their attribute path;
* every Keras model, layer and :class:`~influence_lib.InfluenceModel` contributes all its weights
  (an InfluenceModel also its watched layers and loss);
* every tensor, variable or array held by the calculator or a library object it holds is state.
"""
import keras
import numpy as np
import tensorflow as tf

from ..common.storage import fingerprint_variables
from ..model.influence_model import InfluenceModel

_SCALARS = (bool, int, float, str, np.integer, np.floating)


def _setting(value):
    """A JSON-able form of a scalar setting, or ``None`` if ``value`` is not one."""
    if isinstance(value, _SCALARS):
        return value.item() if isinstance(value, (np.integer, np.floating)) else value
    if isinstance(value, tf.DType):
        return value.name
    if isinstance(value, (list, tuple)) and value and all(isinstance(item, _SCALARS) for item in value):
        return [item.item() if isinstance(item, (np.integer, np.floating)) else item for item in value]
    return None


def describe_callable(function) -> str:
    """A stable description of a loss or batch function: its class/name and Keras config if any."""
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    config = getattr(function, "get_config", None)
    if callable(config):
        try:
            return f"{type(function).__qualname__}{sorted(config().items())}"
        except (TypeError, NotImplementedError, AttributeError):
            return name
    return name


class _Collector:
    """Walks an object graph once, gathering settings, model weights and state tensors."""

    def __init__(self, ignored: tuple[str, ...]):
        self.ignored = ignored
        self.settings: dict[str, object] = {}
        self.weights: list = []
        self.state: list = []
        self._seen: set[int] = set()

    def visit(self, value, path: str) -> None:
        if id(value) in self._seen or isinstance(value, tf.data.Dataset):
            return
        if isinstance(value, InfluenceModel):
            self._seen.add(id(value))
            watched = getattr(value, "watched_layers", value.layers)
            self.settings[f"{path}.watched_layers"] = [layer.name for layer in watched]
            self.settings[f"{path}.watched_shapes"] = [list(shape) for shape in value.weight_shapes]
            self.settings[f"{path}.loss"] = describe_callable(value.loss_function)
            self.settings[f"{path}.process_batch"] = describe_callable(value.process_batch_for_loss_fn)
            self.visit(value.model, f"{path}.model")
        elif isinstance(value, keras.layers.Layer):
            self._seen.add(id(value))
            self.weights.extend(value.weights)
        elif isinstance(value, (tf.Variable, keras.Variable, np.ndarray)) or (
            isinstance(value, tf.Tensor) and hasattr(value, "numpy")
        ):
            self._seen.add(id(value))
            self.state.append(value)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                self.visit(item, f"{path}[{index}]")
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                self.visit(value[key], f"{path}[{key!r}]")
        elif type(value).__module__.startswith("influence_lib."):
            self._seen.add(id(value))
            self.visit_attributes(value, f"{path}.")

    def visit_attributes(self, owner, prefix: str) -> None:
        for name in sorted(vars(owner)):
            if name.startswith("_") or name in self.ignored:
                continue
            value = vars(owner)[name]
            setting = _setting(value)
            if setting is not None or value is None:
                self.settings[f"{prefix}{name}"] = setting
            else:
                self.visit(value, f"{prefix}{name}")


def calculator_state(calculator, ignored: tuple[str, ...] = ("show_progress",)) -> dict:
    """Settings, weights hash and fitted-state hash of ``calculator`` (see the module docstring).

    Parameters
    ----------
    calculator
        Any influence calculator.
    ignored
        Attribute names that do not affect the values (e.g. ``show_progress``).

    Returns
    -------
    dict
        ``{setting path: value, ..., 'weights': sha256, 'state': sha256}``.
    """
    collector = _Collector(ignored)
    collector._seen.add(id(calculator))
    collector.visit_attributes(calculator, "")
    return {
        **collector.settings,
        "weights": fingerprint_variables(collector.weights),
        "state": fingerprint_variables(collector.state),
    }
