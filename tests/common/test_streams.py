"""GeneratorDataset: the eager fast path yields what ``tf.data.Dataset.from_generator`` yields."""
import numpy as np
import pytest
import tensorflow as tf

from influence_lib.common.streams import GeneratorDataset

SIGNATURE = ((tf.TensorSpec((None, 2), tf.float32), tf.TensorSpec((None,), tf.int64)), tf.TensorSpec((None,), tf.float32))


def elements():
    rng = np.random.default_rng(0)
    for size in (3, 1, 2):
        inputs = rng.normal(size=(size, 2))  # float64: both paths cast to the signature's float32
        yield (inputs, np.arange(size, dtype=np.int64)), inputs.sum(axis=1)


def as_numpy(element):
    return tf.nest.map_structure(lambda t: np.asarray(t), element)


def assert_same_elements(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        tf.nest.map_structure(np.testing.assert_array_equal, as_numpy(got), as_numpy(want))


def test_eager_iteration_equals_from_generator():
    stream = GeneratorDataset(elements, SIGNATURE)
    assert isinstance(stream, tf.data.Dataset)
    reference = list(tf.data.Dataset.from_generator(elements, output_signature=SIGNATURE))
    eager = list(stream)
    assert_same_elements(eager, reference)
    assert all(t.dtype == tf.float32 for t in (eager[0][0][0], eager[0][1]))
    assert_same_elements(list(stream), reference)  # re-iterable
    assert_same_elements(list(stream.map(lambda batch, values: (batch, values))), reference)  # tf.data path
    assert_same_elements(list(stream.take(2)), reference[:2])


def test_lazy_until_iterated_and_get_next():
    calls = []

    def counted():
        calls.append(1)
        yield from elements()

    stream = GeneratorDataset(counted, SIGNATURE)
    assert not calls
    iterator = iter(stream)
    first = iterator.get_next()
    assert len(calls) == 1
    assert_same_elements([first], [next(iter(tf.data.Dataset.from_generator(elements, output_signature=SIGNATURE)))])


def test_graph_mode_save_and_load(tmp_path):
    stream = GeneratorDataset(elements, SIGNATURE)
    total = tf.function(lambda: stream.reduce(0.0, lambda acc, element: acc + tf.reduce_sum(element[1])))()
    expected = sum(float(np.sum(values)) for _, values in elements())
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)
    tf.data.Dataset.save(stream, str(tmp_path / "saved"))
    assert_same_elements(list(tf.data.Dataset.load(str(tmp_path / "saved"))), list(stream))


def test_errors_surface_unchanged_and_shapes_are_checked():
    class Boom(Exception):
        pass

    def failing():
        yield from elements()
        raise Boom("the generator's own message")

    with pytest.raises(Boom, match="own message"):
        list(GeneratorDataset(failing, SIGNATURE))

    def wrong_shape():
        yield (np.zeros((2, 3)), np.zeros(2, np.int64)), np.zeros(2)

    with pytest.raises(TypeError, match=r"shape \(2, 3\)"):
        list(GeneratorDataset(wrong_shape, SIGNATURE))
