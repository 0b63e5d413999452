"""Per-batch checks of what the loss receives and returns, with clear errors even inside ``tf.function``.

:func:`check_per_sample_loss` runs on every batch inside :meth:`InfluenceModel._per_sample_loss`:

* the per-sample loss must have one value per sample: leading dimension equal to the batch size
  (a loss reduced with ``keepdims`` returns ``(1,)``; a flattened ``batch × classes`` vector
  does not fit either);
* a sample weight must hold one value per sample;
* integer (sparse) class labels must lie in ``[0, classes)`` (:func:`check_targets`, before the loss runs).

Each is checked on static shapes when they are known (a ``ValueError`` while tracing, i.e. at the
first batch) and otherwise by a marked runtime assertion
(:func:`~influence_lib.common.graph_errors.assert_that`) that every compiled function of the library
re-raises as a ``ValueError`` with the message, instead of a raw ``InvalidArgumentError``
("Graph execution error"); TensorFlow's own out-of-range-label error is converted the same way.
"""
import tensorflow as tf

from ..common.graph_errors import assert_that, label_message


def _leading(tensor) -> tuple[int | None, tf.Tensor]:
    static = tensor.shape[0] if tensor.shape.rank else None
    return static, tf.shape(tensor)[0]


def _check_losses(losses: tf.Tensor, batch_static, batch) -> None:
    size_static, size = _leading(losses)
    fix = (
        "The loss must return one value per sample (shape (batch,)): create a Keras loss with reduction=None, "
        "and do not reduce with keepdims=True nor flatten per-class values (average them per sample)."
    )
    if size_static is not None and batch_static is not None:
        if size_static != batch_static:
            raise ValueError(
                f"The loss function returned {size_static} values for a batch of {batch_static} samples "
                f"(shape {tuple(losses.shape)}). {fix}"
            )
        return
    assert_that(tf.equal(size, batch), "The loss function returned", size, "values for a batch of", batch,
          f"samples. {fix}")


def _check_sample_weight(sample_weight, batch_static, batch) -> None:
    if sample_weight is None:
        return
    sample_weight = tf.convert_to_tensor(sample_weight)
    count_static = sample_weight.shape.num_elements()
    fix = "Pass one weight per sample: a sample_weight of shape (batch,) or (batch, 1)."
    if count_static is not None and batch_static is not None:
        if count_static != batch_static:
            raise ValueError(
                f"The sample weight has shape {tuple(sample_weight.shape)} ({count_static} values) for a batch of "
                f"{batch_static} samples. {fix}"
            )
        return
    assert_that(tf.equal(tf.size(sample_weight), batch), "The sample weight has", tf.size(sample_weight),
          "values for a batch of", batch, f"samples. {fix}")


def _check_sparse_labels(targets, outputs) -> tf.Operation | None:
    if not isinstance(targets, tf.Tensor) or not isinstance(outputs, tf.Tensor) or not targets.dtype.is_integer:
        return None
    if outputs.shape.rank is None or targets.shape.rank is None or outputs.shape.rank < 2:
        return None
    classes = outputs.shape[-1]
    sparse = targets.shape.rank == outputs.shape.rank - 1 or (
        targets.shape.rank == outputs.shape.rank and targets.shape[-1] == 1
    )
    if classes is None or classes < 2 or not sparse:
        return None
    labels = tf.reshape(targets, [-1])
    out_of_range = tf.logical_or(labels < 0, labels >= classes)
    first_bad = tf.gather(labels, tf.argmax(tf.cast(out_of_range, tf.int32), output_type=tf.int32))
    valid = tf.logical_not(tf.reduce_any(out_of_range))
    if tf.executing_eagerly():
        if not bool(valid):
            raise ValueError(label_message(int(first_bad), classes))
        return None
    prefix, suffix = label_message("LABEL", classes).split("LABEL")
    return assert_that(valid, prefix.strip(), first_bad, suffix.strip())


def check_targets(targets, outputs):
    """``targets`` after checking that integer (sparse) class labels lie in ``[0, classes)``.

    In a graph the returned targets depend on the check, so the loss never runs on a bad label
    (on a GPU an out-of-range ``gather`` would silently read zeros instead of failing).
    """
    check = _check_sparse_labels(targets, tf.nest.flatten(outputs)[0])
    if check is None:
        return targets
    with tf.control_dependencies([check]):
        return tf.identity(targets)


def check_per_sample_loss(losses: tf.Tensor, outputs, sample_weight) -> tf.Tensor:
    """Check one batch's per-sample ``losses`` (see the module docstring) and return them.

    Parameters
    ----------
    losses
        What the loss function returned, reduced to rank 1 over the non-batch axes.
    outputs
        The model's outputs (a nested structure for multi-output models: its first leaf gives the batch size).
    sample_weight
        The batch's sample weight (or ``None``).

    Raises
    ------
    ValueError
        When the shapes are known statically; otherwise the check fails at run time (re-raised
        as a ``ValueError`` by the compiled function that runs it).
    """
    first_output = tf.nest.flatten(outputs)[0]
    batch_static, batch = _leading(first_output)
    _check_losses(losses, batch_static, batch)
    _check_sample_weight(sample_weight, batch_static, batch)
    return losses
