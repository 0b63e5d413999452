"""Loss defaults follow Keras: compiled loss, identifiers, refusal of losses that cannot fit, logits path."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import influence_lib as il
from tests.reference_math import softmax, softmax_gradients


def _model(units: int, activation: str | None, d: int = 4, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((d,)), keras.layers.Dense(units, activation=activation)])


def _data(n: int = 12, d: int = 4, c: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    labels = rng.integers(0, c, size=n)
    return x, labels, np.eye(c, dtype=np.float32)[labels]


def _jacobian(loss_function, model, dataset):
    return il.InfluenceModel(model, loss_function=loss_function).batch_jacobian(dataset).numpy()


@pytest.mark.parametrize(
    ("compiled", "explicit", "sparse", "activation"),
    [
        ("sparse_categorical_crossentropy", keras.losses.SparseCategoricalCrossentropy(reduction=None), True,
         "softmax"),
        ("categorical_crossentropy", keras.losses.CategoricalCrossentropy(reduction=None), False, "softmax"),
        (keras.losses.CategoricalCrossentropy(from_logits=True),
         keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None), False, None),
        ("mse", keras.losses.MeanSquaredError(reduction=None), False, None),
    ],
)
def test_compiled_loss_is_the_default(compiled, explicit, sparse, activation):
    model = _model(3, activation)
    model.compile(loss=compiled)
    x, labels, one_hot = _data()
    dataset = tf.data.Dataset.from_tensor_slices((x, labels if sparse else one_hot)).batch(5)
    default = il.InfluenceModel(model)
    assert default.loss_function.reduction is None
    np.testing.assert_allclose(default.batch_jacobian(dataset).numpy(), _jacobian(explicit, model, dataset), atol=1e-6)


def test_string_identifiers_and_keras_functions_equal_the_loss_objects():
    model = _model(3, None)
    x, _, one_hot = _data()
    dataset = tf.data.Dataset.from_tensor_slices((x, one_hot)).batch(5)
    reference = _jacobian(keras.losses.MeanSquaredError(reduction=None), model, dataset)
    for identifier in ("mse", "mean_squared_error", "MeanSquaredError", keras.losses.mean_squared_error):
        np.testing.assert_allclose(_jacobian(identifier, model, dataset), reference, atol=1e-6)
    # ground truth: d/dz mean((z - y)²) = 2 (z - y) / C, and ∂z/∂W = x
    z = x @ model.layers[0].kernel.numpy() + model.layers[0].bias.numpy()
    delta = 2.0 * (z - one_hot) / 3.0
    expected = np.concatenate([np.einsum("nd,nc->ndc", x, delta).reshape(len(x), -1), delta], axis=1)
    np.testing.assert_allclose(reference, expected, atol=1e-5)


def test_uncompiled_defaults_follow_the_output_layer():
    x, labels, one_hot = _data()
    dataset = tf.data.Dataset.from_tensor_slices((x, one_hot)).batch(5)
    logits_model = _model(3, None)
    expected = softmax_gradients(x, one_hot, logits_model.layers[0].kernel.numpy(), logits_model.layers[0].bias.numpy())
    np.testing.assert_allclose(il.InfluenceModel(logits_model).batch_jacobian(dataset).numpy(), expected, atol=1e-5)
    softmax_model = _model(3, "softmax")
    expected = softmax_gradients(
        x, one_hot, softmax_model.layers[0].kernel.numpy(), softmax_model.layers[0].bias.numpy()
    )
    np.testing.assert_allclose(il.InfluenceModel(softmax_model).batch_jacobian(dataset).numpy(), expected, atol=1e-5)
    sigmoid_model = _model(1, "sigmoid")
    targets = (labels % 2).astype(np.float32)[:, None]
    binary = tf.data.Dataset.from_tensor_slices((x, targets)).batch(5)
    z = x.astype(np.float64) @ sigmoid_model.layers[0].kernel.numpy() + sigmoid_model.layers[0].bias.numpy()
    delta = 1.0 / (1.0 + np.exp(-z)) - targets  # d/dz of binary cross-entropy on sigmoid(z)
    expected = np.concatenate([x * delta, delta], axis=1)
    np.testing.assert_allclose(il.InfluenceModel(sigmoid_model).batch_jacobian(binary).numpy(), expected, atol=1e-6)


def test_regression_model_without_loss_is_refused_not_zero():
    model = _model(1, None)
    with pytest.raises(ValueError, match="one output per sample.*loss_function='mse'"):
        il.InfluenceModel(model)
    with pytest.raises(ValueError, match="categorical cross-entropy but the model has one output"):
        il.InfluenceModel(model, loss_function="categorical_crossentropy")
    with pytest.raises(ValueError, match="categorical cross-entropy but the model has one output"):
        il.InfluenceModel(model, loss_function="sparse_categorical_crossentropy")


def test_mismatched_from_logits_is_refused():
    with pytest.raises(ValueError, match="expects probabilities.*no activation: its outputs are logits"):
        il.InfluenceModel(_model(3, None), loss_function=keras.losses.CategoricalCrossentropy(reduction=None))
    with pytest.raises(ValueError, match="from_logits=True but the model's output layer.*applies softmax"):
        il.InfluenceModel(
            _model(3, "softmax"),
            loss_function=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None),
        )
    compiled = _model(3, "softmax")
    compiled.compile(loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="from_logits=True"):
        il.InfluenceModel(compiled)


def test_integer_labels_with_categorical_loss_say_what_to_do():
    x, labels, _ = _data()
    dataset = tf.data.Dataset.from_tensor_slices((x, labels)).batch(5)
    influence_model = il.InfluenceModel(_model(3, "softmax"))
    with pytest.raises(ValueError, match="integer class labels.*sparse_categorical_crossentropy"):
        influence_model.batch_loss(dataset)


def test_bad_identifiers_and_reduced_losses():
    with pytest.raises(ValueError, match="Unknown loss identifier 'not_a_loss'"):
        il.InfluenceModel(_model(3, None), loss_function="not_a_loss")
    with pytest.raises(TypeError, match="loss_function must be"):
        il.InfluenceModel(_model(3, None), loss_function=3)
    with pytest.raises(ValueError, match="reduction=None"):
        il.InfluenceModel(_model(3, None), loss_function=keras.losses.MeanSquaredError())
    multi = _model(3, None)
    multi.compile(loss=["mse"])
    with pytest.raises(ValueError, match="one loss per output"):
        il.InfluenceModel(multi)


def test_model_is_unchanged_after_the_logits_path():
    model = _model(3, "softmax")
    x, _, one_hot = _data()
    before = model(x).numpy()
    il.InfluenceModel(model).batch_jacobian(tf.data.Dataset.from_tensor_slices((x, one_hot)).batch(5))
    assert model.layers[0].activation is keras.activations.softmax
    np.testing.assert_array_equal(model(x).numpy(), before)


def _confident_problem(n: int = 16, d: int = 5, c: int = 4, seed: int = 3):
    """A softmax regression whose samples have 1 − p_y between 1e-12 and 1e-4."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    kernel = rng.normal(size=(d, c)).astype(np.float32)
    labels = np.argmax(x @ kernel, axis=1)
    margins = np.linspace(10.0, 28.0, n)
    logits = x @ kernel
    scale = margins / (np.take_along_axis(logits, labels[:, None], 1)[:, 0] - np.sort(logits, axis=1)[:, -2])
    x = (x * scale[:, None]).astype(np.float32)
    return x, np.eye(c, dtype=np.float32)[labels], kernel, np.zeros(c, np.float32)


def test_confident_samples_float32_scores_match_float64():
    x, y, kernel, bias = _confident_problem()
    probabilities = softmax(x.astype(np.float64) @ kernel + bias)
    assert (1.0 - (probabilities * y).sum(1)).min() < 1e-10
    model = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(y.shape[1], activation="softmax")])
    model.layers[0].set_weights([kernel, bias])
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    reference = softmax_gradients(x, y, kernel.astype(np.float64), bias.astype(np.float64))
    influence_model = il.InfluenceModel(model)
    gradients = influence_model.batch_jacobian(dataset).numpy()
    scale = np.linalg.norm(reference, axis=1, keepdims=True)
    np.testing.assert_array_less(np.abs(gradients - reference) / scale, 1e-3)
    tracin = il.TracIn([influence_model], 1.0, show_progress=False)
    scores = il.extract_only_values(tracin.compute_influence_values(dataset)).numpy()
    expected = (reference**2).sum(1)
    np.testing.assert_array_less(np.abs(scores - expected) / expected, 1e-3)
    pairwise = tracin.influence_between_batches((x[:8], y[:8]), (x, y)).numpy()
    np.testing.assert_array_less(np.abs(pairwise - reference[:8] @ reference.T), 1e-3 * scale[:8] @ scale.T)


def test_shared_output_layer_keeps_the_probability_path():
    inputs = keras.Input((3,))
    head = keras.layers.Dense(3, activation="softmax")
    model = keras.Model(inputs, head(head(inputs)))
    influence_model = il.InfluenceModel(model)
    assert influence_model._loss_path.logits_layer is None
    assert il.InfluenceModel(_model(3, "softmax"))._loss_path.logits_layer is not None


def test_integer_labels_with_the_compiled_sparse_loss_match_numpy():
    model = _model(3, "softmax")
    model.compile(loss="sparse_categorical_crossentropy")
    x, labels, one_hot = _data()
    dataset = tf.data.Dataset.from_tensor_slices((x, labels)).batch(5)
    kernel, bias = (w.numpy().astype(np.float64) for w in model.layers[0].weights)
    np.testing.assert_allclose(
        il.InfluenceModel(model).batch_jacobian(dataset).numpy(), softmax_gradients(x, one_hot, kernel, bias), atol=1e-5
    )


def test_multi_output_model_needs_a_loss_and_works_with_one():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, [keras.layers.Dense(2, activation="softmax")(inputs), keras.layers.Dense(1)(inputs)])
    with pytest.raises(ValueError, match=r"has 2 outputs and was not compiled with a loss.*loss_function="):
        il.InfluenceModel(model, start_layer=-1)
    with pytest.raises(TypeError, match="loss_function must be a Keras loss identifier .* got int"):
        il.InfluenceModel(model, loss_function=3)

    def summed(y_true, y_pred):
        return tf.reduce_sum(tf.square(y_pred[1] - y_true[1]), axis=-1)

    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    y = (np.eye(2, dtype=np.float32)[[0, 1, 0, 1]], np.ones((4, 1), np.float32))
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(2)
    influence_model = il.InfluenceModel(model, start_layer=-1, loss_function=summed)
    kernel, bias = [w.numpy().astype(np.float64) for w in influence_model.weights]
    residual = x.astype(np.float64) @ kernel + bias - 1.0
    expected = np.concatenate([(2 * x[:, :, None] * residual[:, None, :]).reshape(4, -1), 2 * residual], axis=1)
    np.testing.assert_allclose(influence_model.batch_jacobian(dataset).numpy(), expected, rtol=1e-4, atol=1e-5)
