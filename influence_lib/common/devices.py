"""Run a calculator's work on a chosen device (``device='/GPU:0'``), as Influenciae's ``device=`` does.

Results stream lazily, so the device must hold while each element is computed, not only while
the stream is built: :func:`on_device` enters ``tf.device`` around every step of the
generator. ``device=None`` keeps TensorFlow's default placement.
"""
import contextlib
from collections.abc import Callable, Iterator

import tensorflow as tf


def check_device(device: str | None) -> str | None:
    """Validate a device name against the devices TensorFlow sees (``None`` passes through).

    Raises
    ------
    TypeError
        If ``device`` is not a string.
    ValueError
        If it is not a device name (``'/CPU:0'``, ``'/GPU:1'``, ``'GPU:0'``) of this machine.
    """
    if device is None:
        return None
    if not isinstance(device, str):
        raise TypeError(f"device must be a device name such as '/CPU:0' or '/GPU:0', or None; got {device!r}.")
    available = [tf.DeviceSpec.from_string(logical.name) for logical in tf.config.list_logical_devices()]
    names = [f"/{spec.device_type}:{spec.device_index}" for spec in available]
    try:
        wanted = tf.DeviceSpec.from_string(device if device.startswith("/") else f"/{device}")
    except ValueError as error:
        raise ValueError(f"device={device!r} is not a device name; this machine has {names}.") from error
    found = any(
        wanted.device_type is not None
        and wanted.device_type.upper() == spec.device_type
        and wanted.device_index in (None, spec.device_index)
        for spec in available
    )
    if not found:
        raise ValueError(f"device={device!r} does not exist on this machine; it has {names}.")
    return device


def device_scope(device: str | None) -> contextlib.AbstractContextManager:
    """``tf.device(device)``, or no change for ``None``."""
    return contextlib.nullcontext() if device is None else tf.device(device)


def on_device(device: str | None, make_iterator: Callable[[], Iterator]) -> Callable[[], Iterator]:
    """``make_iterator`` whose every element is computed under ``tf.device(device)``."""
    if device is None:
        return make_iterator

    def iterate() -> Iterator:
        with device_scope(device):
            iterator = iter(make_iterator())
        while True:
            with device_scope(device):
                try:
                    element = next(iterator)
                except StopIteration:
                    return
            yield element

    return iterate
