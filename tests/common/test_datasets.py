import numpy as np
import tensorflow as tf

from influence_lib.common.datasets import batch_size_of, size_of


def test_size_of_reads_each_axis_of_an_eager_tensor():
    array = np.zeros((5, 3, 2), np.float32)
    tensor = tf.constant(array)
    assert [size_of(tensor, axis) for axis in range(3)] == list(array.shape)
    assert size_of(tensor, axis=-1) == 2


def test_batch_size_of_is_the_leading_size_of_the_first_component():
    batch = (tf.zeros((7, 4)), tf.zeros((7, 10)), tf.ones((7,)))
    assert batch_size_of(batch) == 7
    dataset = tf.data.Dataset.from_tensor_slices((np.zeros((10, 2)), np.zeros(10))).batch(4)
    assert [batch_size_of(tuple(batch)) for batch in dataset] == [4, 4, 2]
