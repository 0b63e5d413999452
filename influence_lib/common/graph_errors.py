"""Clear errors out of compiled (``tf.function``) code.

A check that can only run on runtime values inside a ``tf.function`` fails as a
``tf.debugging.Assert``, i.e. a raw ``InvalidArgumentError`` ("Graph execution error") by the time
it reaches the user. The library's checks put their message between two markers
(:func:`assertion_data`); :func:`converted_error` recovers it (and recognizes TensorFlow's own
out-of-range sparse label error) so that :mod:`influence_lib.common.compiled` can re-raise a
``ValueError`` carrying only the message.
"""
import re

import tensorflow as tf

_START, _END = "<<influence_lib:", ">>"
_MARKED = re.compile(r"\[<<influence_lib:\]\s*(.*?)\s*\[>>\]", re.DOTALL)
_TF_LABEL = re.compile(r"Received a label value of (-?\d+) which is outside the valid range of \[0, (\d+)\)")


def label_message(label, classes: int) -> str:
    """The message for a sparse class label outside ``[0, classes)``."""
    return (
        f"A sparse integer label is out of range: got label {label} for a model with {classes} classes (valid "
        f"labels are 0 to {classes - 1}). Fix the labels (map them to 0..{classes - 1}) or give the model one "
        "output per class."
    )


def assert_that(condition: tf.Tensor, *parts) -> tf.Operation | None:
    """Check ``condition``: eagerly raise ``ValueError(" ".join(parts))`` at once; in a graph add a marked
    ``tf.debugging.Assert`` whose failure :func:`converted_error` turns into that ``ValueError``, and return
    it (for a control dependency: computations that must not run on bad values wait for it)."""
    if tf.executing_eagerly():
        if not bool(condition):
            raise ValueError(" ".join(str(part.numpy() if hasattr(part, "numpy") else part) for part in parts))
        return None
    return tf.debugging.Assert(condition, [_START, *parts, _END], summarize=4)


def converted_error(error: tf.errors.InvalidArgumentError) -> ValueError | None:
    """The ``ValueError`` for a failed :func:`assert_that` (or an out-of-range sparse label), else ``None``."""
    message = error.message or ""
    marked = _MARKED.search(message)
    if marked:
        parts = re.findall(r"\[(.*?)\]", marked.group(1), re.DOTALL)
        return ValueError(" ".join(part.strip() for part in parts))
    label = _TF_LABEL.search(message)
    if label:
        return ValueError(label_message(label.group(1), int(label.group(2))))
    return None
