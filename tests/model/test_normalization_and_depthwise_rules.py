"""Closed-form rules for BatchNormalization, LayerNormalization, depthwise/separable convolutions and
attention projections equal the pfor jacobian; keras.applications layers; explicit layer lists."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from influence_lib import InfluenceModel


def _randomize(model: keras.Model, seed: int) -> None:
    """Random weights everywhere, including BatchNormalization's moving statistics (positive variance)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for weight in layer.weights:
            value = rng.normal(scale=0.5, size=weight.shape)
            if "variance" in weight.path:
                value = rng.uniform(0.5, 2.0, size=weight.shape)
            weight.assign(value.astype(np.float32))


def _materialized(influence_model: InfluenceModel, inputs, targets) -> np.ndarray:
    """Per-sample gradients one sample at a time with a plain GradientTape (no closed form, no pfor)."""
    rows = []
    for index in range(len(inputs)):
        with tf.GradientTape() as tape:
            sample = (inputs[index : index + 1], targets[index : index + 1])
            loss = tf.reduce_sum(influence_model.batch_loss_tensor(sample))
        rows.append(influence_model.flatten(tape.gradient(loss, influence_model.weights)).numpy())
    return np.stack(rows)


def _check_against_jacobian(model, inputs, targets, start, last, loss=None, atol=1e-5):
    closed = InfluenceModel(model, start, last, loss_function=loss)
    assert closed.fallback_reason is None, closed.fallback_reason
    batch_a, batch_b = (inputs[:3], targets[:3]), (inputs[3:], targets[3:])
    expected = _materialized(closed, *batch_a)
    other = _materialized(closed, *batch_b)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(closed.batch_jacobian_tensor(batch_a).numpy(), expected, atol=atol * scale)
    assert closed.fallback_reason is None, closed.fallback_reason
    np.testing.assert_allclose(
        closed.batch_gradient_norm_sq_tensor(batch_a).numpy(), (expected**2).sum(1), rtol=1e-4, atol=1e-6 * scale**2
    )
    np.testing.assert_allclose(
        closed.batch_gradient_dot_tensor(batch_a, batch_b).numpy(), expected @ other.T, rtol=1e-4,
        atol=1e-5 * scale * np.abs(other).max() * expected.shape[1] ** 0.5,
    )
    return closed


def _classification_data(shape, classes=3, n=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    return x, np.eye(classes, dtype=np.float32)[rng.integers(0, classes, n)]


def test_conv_batchnorm_depthwise_separable_cnn():
    model = keras.Sequential([
        keras.Input((8, 8, 2)),
        keras.layers.Conv2D(3, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.DepthwiseConv2D(3, strides=2, depth_multiplier=2, padding="valid", activation="tanh"),
        keras.layers.BatchNormalization(center=False),
        keras.layers.SeparableConv2D(4, 2, padding="same", strides=2, depth_multiplier=2),
        keras.layers.DepthwiseConv2D(2, dilation_rate=2, padding="same", use_bias=False),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.LayerNormalization(),
        keras.layers.Dense(3, activation="softmax"),
    ])
    _randomize(model, seed=1)
    x, y = _classification_data((8, 8, 2))
    closed = _check_against_jacobian(model, x, y, 0, -1)
    kinds = {type(layer).__name__ for layer in closed.closed_form_layers}
    assert {"BatchNormalization", "DepthwiseConv2D", "SeparableConv2D", "LayerNormalization"} <= kinds


def test_layer_normalization_over_several_axes_and_sequences():
    model = keras.Sequential([
        keras.Input((4, 5)),
        keras.layers.LayerNormalization(axis=[1, 2]),
        keras.layers.Dense(6, activation="relu"),
        keras.layers.LayerNormalization(scale=False),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])
    _randomize(model, seed=2)
    x, y = _classification_data((4, 5))
    _check_against_jacobian(model, x, y, 0, -1)


def test_attention_projections_of_a_text_model():
    tokens = keras.Input((6,), dtype="int32")
    embedded = keras.layers.Embedding(11, 8)(tokens)
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name="attention")(embedded, embedded)
    normalized = keras.layers.LayerNormalization()(attended + embedded)
    pooled = keras.layers.GlobalAveragePooling1D()(normalized)
    model = keras.Model(tokens, keras.layers.Dense(3, activation="softmax")(pooled))
    _randomize(model, seed=3)
    rng = np.random.default_rng(4)
    x = rng.integers(0, 11, size=(5, 6)).astype(np.int32)
    y = rng.integers(0, 3, size=5)
    closed = _check_against_jacobian(model, x, y, 0, -1, loss="sparse_categorical_crossentropy")
    assert [layer.name for layer in closed.closed_form_layers if type(layer) is keras.layers.EinsumDense] == [
        "query", "key", "value", "attention_output"
    ]


def test_batchnorm_uses_the_moving_statistics_in_inference_mode():
    model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(), keras.layers.Dense(2)])
    _randomize(model, seed=5)
    x, y = _classification_data((3,), classes=2)
    bn = model.layers[0]
    mean, variance = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    normalized = (x - mean) / np.sqrt(variance + bn.epsilon)
    kernel, bias = (w.numpy() for w in model.layers[1].weights)
    logits = (normalized * bn.gamma.numpy() + bn.beta.numpy()) @ kernel + bias
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    delta = (probabilities - y) @ kernel.T
    expected = np.concatenate([delta * normalized, delta], axis=1)
    gradients = InfluenceModel(model, 0).batch_jacobian_tensor((x, y)).numpy()
    np.testing.assert_allclose(gradients, expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def mobilenet():
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=4)
    x = np.random.default_rng(0).normal(size=(5, 32, 32, 3)).astype(np.float32)
    return model, x, np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0]]


def test_mobilenet_layers_norms_and_dots_equal_materialized_gradients(mobilenet):
    model, x, y = mobilenet
    layers = ["Conv1", "bn_Conv1", "block_1_expand", "block_1_depthwise", "block_8_project", "predictions"]
    closed = InfluenceModel(model, layers)
    assert closed.fallback_reason is None and "closed form" in closed.per_sample_gradient_path
    materialized = _materialized(closed, x, y)
    train, queries = (x[2:], y[2:]), (x[:2], y[:2])
    norms = closed.batch_gradient_norm_sq_tensor(train).numpy()
    np.testing.assert_allclose(norms, (materialized[2:] ** 2).sum(1), rtol=1e-4)
    dots = closed.batch_gradient_dot_tensor(queries, train).numpy()
    expected = materialized[:2] @ materialized[2:].T
    np.testing.assert_allclose(dots, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert closed.fallback_reason is None


def test_explicit_layer_list_skips_a_layer():
    model = keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(5, name="a"), keras.layers.Dense(4, name="b"),
        keras.layers.Dense(3, name="c"),
    ])
    listed = InfluenceModel(model, ["c", 0])
    assert [layer.name for layer in listed.watched_layers] == ["a", "c"]
    assert listed.nb_params == 4 * 5 + 5 + 4 * 3 + 3
    full = InfluenceModel(model, 0, -1)
    x, y = _classification_data((4,))
    jacobian = full.batch_jacobian_tensor((x, y)).numpy()
    keep = np.r_[0:25, 49:64]
    np.testing.assert_allclose(listed.batch_jacobian_tensor((x, y)).numpy(), jacobian[:, keep], atol=1e-6)
    with pytest.raises(ValueError, match="either a list of layers"):
        InfluenceModel(model, ["a"], "c")
    with pytest.raises(ValueError, match="names a layer twice"):
        InfluenceModel(model, ["a", 0])
    with pytest.raises(ValueError, match="is empty"):
        InfluenceModel(model, [])
    with pytest.raises(ValueError, match="Unknown layer name 'z'"):
        InfluenceModel(model, ["z"])


def test_fallback_reason_is_known_at_construction():
    model = keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(3), keras.layers.PReLU(), keras.layers.Dense(3),
    ])
    influence_model = InfluenceModel(model, 0, -1)
    assert "no closed-form rule for layer" in influence_model.fallback_reason
    assert influence_model.per_sample_gradient_path.startswith("vectorized jacobian")
    assert InfluenceModel(model).fallback_reason is None


def test_new_rules_in_float64_match_the_jacobian_to_round_off():
    dtype = "float64"
    model = keras.Sequential([
        keras.Input((6, 6, 2), dtype=dtype),
        keras.layers.BatchNormalization(dtype=dtype),
        keras.layers.DepthwiseConv2D(3, padding="same", dtype=dtype),
        keras.layers.SeparableConv2D(2, 2, dtype=dtype),
        keras.layers.GlobalAveragePooling2D(dtype=dtype),
        keras.layers.LayerNormalization(dtype=dtype),
        keras.layers.Dense(3, activation="softmax", dtype=dtype),
    ])
    _randomize(model, seed=6)
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(4, 6, 6, 2)), np.eye(3)[[0, 1, 2, 0]]
    closed = InfluenceModel(model, 0, -1)
    gradients = closed.batch_jacobian_tensor((x, y))
    assert closed.fallback_reason is None and gradients.dtype == tf.float64
    expected = InfluenceModel(model, 0, -1, per_sample_gradients="jacobian").batch_jacobian_tensor((x, y)).numpy()
    np.testing.assert_allclose(gradients.numpy(), expected, atol=1e-12 * np.abs(expected).max())
