"""Closed-form per-sample gradients against independent references.

References: a float64 NumPy closed form for a softmax regression, and ``tape.gradient`` of each
sample's loss computed ALONE (a Python loop over one-sample batches, straight from the Keras
model and loss, sharing no code with InfluenceModel).
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

from influence_lib.model import InfluenceModel

CCE = keras.losses.CategoricalCrossentropy(reduction=None)


def one_sample_gradients(model, layers, loss_function, inputs, targets, sample_weight=None):
    """Per-sample gradients by differentiating each sample's loss on its own, flattened in layer/weight order."""
    weights = [w.value for layer in layers for w in layer.trainable_weights]
    rows = []
    for i in range(len(targets)):
        with tf.GradientTape() as tape:
            outputs = tf.cast(model(inputs[i : i + 1], training=False), tf.float32)
            loss = loss_function(targets[i : i + 1], outputs)
            loss = tf.reduce_mean(loss)
            if sample_weight is not None:
                loss = loss * sample_weight[i]
        grads = tape.gradient(loss, weights, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        rows.append(np.concatenate([np.reshape(tf.convert_to_tensor(g), [-1]) for g in grads]))
    return np.stack(rows)


def assert_close(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(np.abs(expected).max(), 1e-6)
    np.testing.assert_allclose(actual, expected, atol=rtol * scale, rtol=0)


def one_hot(labels, classes):
    return np.eye(classes, dtype=np.float32)[labels]


def check_closed_form(model, inputs, targets, start, last, loss_function=CCE, sample_weight=None, rtol=1e-5):
    influence_model = InfluenceModel(model, start, last, loss_function=loss_function)
    batch = (inputs, targets) if sample_weight is None else (inputs, targets, sample_weight)
    jacobian = influence_model.batch_jacobian_tensor(batch)
    assert influence_model.fallback_reason is None
    expected = one_sample_gradients(
        model, influence_model.watched_layers, loss_function, inputs, targets, sample_weight
    )
    assert_close(jacobian, expected, rtol)
    return influence_model, jacobian


def test_softmax_regression_matches_numpy_closed_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    y = one_hot(rng.integers(0, 3, 6), 3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    kernel, bias = [w.astype(np.float64) for w in model.layers[0].get_weights()]
    logits = x.astype(np.float64) @ kernel + bias
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    error = probabilities - y
    expected = np.concatenate([np.einsum("bi,bk->bik", x, error).reshape(6, -1), error], axis=1)
    influence_model = InfluenceModel(model)
    jacobian = influence_model.batch_jacobian_tensor((x, y))
    assert_close(jacobian, expected)


def test_mlp_all_layers_with_sample_weights():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 5)).astype(np.float32)
    y = one_hot(rng.integers(0, 3, 7), 3)
    weights = rng.uniform(0.2, 2.0, 7).astype(np.float32)
    model = keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(6, activation="tanh"),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(4, activation="relu", use_bias=False),
        keras.layers.Dense(3, activation="softmax"),
    ])
    check_closed_form(model, x, y, 0, 3, sample_weight=weights)


def test_functional_branches_and_a_shared_layer():
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(4, activation="tanh", name="shared")
    left = keras.layers.Dense(3, activation="sigmoid", name="left")(inputs)
    right = shared(shared(inputs))
    merged = keras.layers.Concatenate(name="merge")([left, right])
    outputs = keras.layers.Dense(2, activation="softmax", name="head")(merged)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    y = one_hot(rng.integers(0, 2, 5), 2)
    names = [layer.name for layer in model.layers]
    check_closed_form(model, x, y, names.index("left"), names.index("head"))


def test_sequence_inputs_and_per_step_loss():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 6, 4)).astype(np.float32)
    labels = rng.integers(0, 3, (5, 6))
    model = keras.Sequential([
        keras.Input((6, 4)),
        keras.layers.Dense(5, activation="gelu"),
        keras.layers.Dense(3),
    ])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    check_closed_form(model, x, labels, 0, 1, loss_function=loss, sample_weight=rng.uniform(0.5, 1.5, 5))


@pytest.mark.parametrize(
    "options",
    [
        dict(kernel_size=3, strides=1, padding="valid"),
        dict(kernel_size=3, strides=2, padding="same"),
        dict(kernel_size=(2, 3), strides=(2, 1), padding="valid"),
        dict(kernel_size=2, dilation_rate=2, padding="same"),
        dict(kernel_size=3, padding="same", use_bias=False),
    ],
)
def test_conv2d(options):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 7, 8, 2)).astype(np.float32)
    y = one_hot(rng.integers(0, 3, 4), 3)
    model = keras.Sequential([
        keras.Input((7, 8, 2)),
        keras.layers.Conv2D(3, activation="relu", **options),
        keras.layers.Conv2D(2, 2, activation="tanh"),
        keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax"),
    ])
    check_closed_form(model, x, y, 0, 3)


@pytest.mark.parametrize(
    "options",
    [
        dict(kernel_size=3, strides=2, padding="same"),
        dict(kernel_size=(3, 2), strides=(1, 3), dilation_rate=1, padding="same"),
        dict(kernel_size=2, dilation_rate=(2, 1), padding="valid"),
    ],
)
def test_conv2d_with_unknown_spatial_size(options):
    """Spatial sizes only known when the batch arrives: padding and slicing are computed at run time."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3, 6, 9, 2)).astype(np.float32)
    y = one_hot(rng.integers(0, 3, 3), 3)
    model = keras.Sequential([
        keras.Input((None, None, 2)),
        keras.layers.Conv2D(3, activation="relu", **options),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, activation="softmax"),
    ])
    check_closed_form(model, x, y, 0, 2)


@pytest.mark.parametrize(
    "options",
    [dict(padding="causal", dilation_rate=2), dict(padding="same", strides=2), dict(padding="valid")],
)
def test_conv1d(options):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 9, 3)).astype(np.float32)
    y = one_hot(rng.integers(0, 2, 4), 2)
    model = keras.Sequential([
        keras.Input((9, 3)),
        keras.layers.Conv1D(4, 3, activation="relu", **options),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(2, activation="softmax"),
    ])
    check_closed_form(model, x, y, 0, 2)


@pytest.mark.parametrize("bias_axes", ["d", "bd", "b"])
def test_embedding_and_einsum_dense_with_repeated_tokens(bias_axes):
    rng = np.random.default_rng(6)
    ids = rng.integers(0, 5, (6, 4)).astype(np.int32)
    ids[:, 1] = ids[:, 0]
    y = one_hot(rng.integers(0, 3, 6), 3)
    model = keras.Sequential([
        keras.Input((4,), dtype="int32"),
        keras.layers.Embedding(5, 3),
        keras.layers.EinsumDense("abc,cd->abd", output_shape=(4, 2), bias_axes=bias_axes, activation="tanh"),
        keras.layers.EinsumDense("abc,bcd->ad", output_shape=3, bias_axes="d", activation="softmax"),
    ])
    check_closed_form(model, ids, y, 0, 2)


def test_partially_trainable_layer_keeps_weight_order():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(5, 3)).astype(np.float32)
    y = one_hot(rng.integers(0, 2, 5), 2)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2, activation="softmax")]
    )
    model.layers[0].bias.trainable = False
    influence_model, jacobian = check_closed_form(model, x, y, 0, 1)
    assert influence_model.nb_params == 3 * 4 + 4 * 2 + 2 == jacobian.shape[1]


def test_mixed_precision_model_gives_float32_gradients():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    y = one_hot(rng.integers(0, 3, 6), 3)
    model = keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(8, activation="tanh", dtype="mixed_float16"),
        keras.layers.Dense(3, activation="softmax", dtype="mixed_float16"),
    ])
    influence_model, jacobian = check_closed_form(model, x, y, 0, 1, rtol=5e-3)
    assert jacobian.dtype == tf.float32


def test_matches_jacobian_path_and_blocks_concatenate():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(6, 6, 6, 1)).astype(np.float32)
    y = one_hot(rng.integers(0, 3, 6), 3)
    model = keras.Sequential([
        keras.Input((6, 6, 1)),
        keras.layers.Conv2D(2, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax"),
    ])
    closed = InfluenceModel(model, 0, 2)
    generic = InfluenceModel(model, 0, 2, per_sample_gradients="jacobian")
    jacobian = closed.batch_jacobian_tensor((x, y))
    assert_close(jacobian, generic.batch_jacobian_tensor((x, y)))
    assert generic.fallback_reason == "per_sample_gradients='jacobian' was requested"
    blocks = closed.batch_jacobian_blocks((x, y))
    assert [int(b.shape[1]) for b in blocks] == [3 * 3 * 2 + 2, 32 * 3 + 3]
    np.testing.assert_array_equal(tf.concat(blocks, axis=1), jacobian)


def test_works_inside_a_user_tf_function_and_dataset_level():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    y = one_hot(rng.integers(0, 2, 8), 2)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    influence_model = InfluenceModel(model)

    @tf.function
    def squared_norms(batch):
        return tf.reduce_sum(tf.square(influence_model.batch_jacobian_tensor(batch)), axis=1)

    expected = one_sample_gradients(model, influence_model.watched_layers, CCE, x, y)
    assert_close(squared_norms((x, y)), np.sum(expected**2, axis=1))
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(3)
    assert_close(influence_model.batch_jacobian(dataset), expected)


def test_invalid_mode_is_rejected():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    with pytest.raises(ValueError, match="per_sample_gradients must be one of"):
        InfluenceModel(model, per_sample_gradients="fast")


def test_per_sample_gradients_are_differentiable():
    """∇_θ Σ_i ‖g_i‖² through the closed form equals nested one-sample tapes."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    y = one_hot(rng.integers(0, 3, 5), 3)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3, activation="softmax")]
    )
    influence_model = InfluenceModel(model, 0, 1)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(tf.square(influence_model.batch_jacobian_tensor((x, y))))
    actual = tape.gradient(total, influence_model.weights)
    assert influence_model.fallback_reason is None

    expected = [np.zeros(w.shape) for w in influence_model.weights]
    for i in range(len(x)):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = tf.reduce_sum(CCE(y[i : i + 1], model(x[i : i + 1], training=False)))
            grads = inner.gradient(loss, influence_model.weights)
            norm_sq = tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads])
        for accumulator, g in zip(expected, outer.gradient(norm_sq, influence_model.weights)):
            accumulator += g.numpy()
    for a, e in zip(actual, expected):
        assert_close(a, e)
