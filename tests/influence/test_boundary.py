"""Boundary-based self-influence checked against analytic DeepFool distances of linear classifiers."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from influence_lib.influence.base import extract_only_values
from influence_lib.influence.boundary_sample import SampleBoundaryCalculator
from influence_lib.influence.boundary_weights import WeightsBoundaryCalculator


def _linear_model(in_dim: int, classes: int, use_bias: bool = True) -> keras.Model:
    return keras.Sequential([keras.Input((in_dim,)), keras.layers.Dense(classes, use_bias=use_bias)])


def _dataset(x: np.ndarray, batch_size: int = 4) -> tf.data.Dataset:
    y = np.zeros((len(x), 1), np.float32)
    return tf.data.Dataset.from_tensor_slices((x.astype(np.float32), y)).batch(batch_size)


def _scores(calculator, dataset) -> np.ndarray:
    return extract_only_values(calculator.compute_influence_values(dataset)).numpy()


def _weights_of(model: keras.Model) -> list[np.ndarray]:
    return [w.numpy().copy() for w in model.weights]


def _assert_bit_identical(before, model):
    for saved, current in zip(before, model.weights):
        assert np.array_equal(saved, current.numpy())


def test_sample_boundary_matches_the_analytic_distance_of_a_linear_classifier():
    model = _linear_model(4, 3)
    x = np.random.normal(size=(10, 4))
    kernel, bias = (w.numpy().astype(np.float64) for w in model.weights)
    logits = x @ kernel + bias
    predicted = logits.argmax(1)
    expected = []
    for row, c in zip(logits, predicted):
        distances = [abs(row[k] - row[c]) / np.linalg.norm(kernel[:, k] - kernel[:, c]) for k in range(3) if k != c]
        expected.append(-min(distances))
    scores = _scores(SampleBoundaryCalculator(model, show_progress=False), _dataset(x))
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)


def test_sample_boundary_reaches_the_boundary_of_a_nonlinear_model_and_is_batch_independent():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)])
    x = np.random.normal(size=(8, 3)).astype(np.float32)
    calculator = SampleBoundaryCalculator(model, step_nbr=50, show_progress=False)
    together = _scores(calculator, _dataset(x, batch_size=8))
    one_by_one = _scores(calculator, _dataset(x, batch_size=1))
    np.testing.assert_allclose(together, one_by_one, rtol=1e-5, atol=1e-6)
    assert np.all(together < 0)


def test_weights_boundary_matches_the_analytic_distance_for_a_linear_head():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(5, activation="relu"), keras.layers.Dense(4)]
    )
    x = np.random.normal(size=(9, 3))
    features = keras.Model(model.inputs[0], model.layers[-1].input)(x.astype(np.float32)).numpy().astype(np.float64)
    kernel, bias = (w.numpy().astype(np.float64) for w in model.layers[-1].weights)
    logits = features @ kernel + bias
    gaps = np.abs(logits - logits[np.arange(len(x)), logits.argmax(1)][:, None])
    gaps[np.arange(len(x)), logits.argmax(1)] = np.inf
    smallest_gap = gaps.min(1)
    l2 = -smallest_gap / np.sqrt(2 * (np.sum(features**2, 1) + 1))
    linf = -smallest_gap / (2 * (np.sum(np.abs(features), 1) + 1))
    for norm_type, expected in ((2, l2), (np.inf, linf)):
        calculator = WeightsBoundaryCalculator(model, norm_type=norm_type, show_progress=False)
        np.testing.assert_allclose(_scores(calculator, _dataset(x)), expected, rtol=1e-4, atol=1e-6)


def test_weights_boundary_without_bias_and_with_softmax_moves_to_the_boundary():
    model = _linear_model(3, 3, use_bias=False)
    x = np.random.normal(size=(6, 3))
    kernel = model.weights[0].numpy().astype(np.float64)
    logits = x @ kernel
    gaps = np.abs(logits - logits.max(1, keepdims=True))
    gaps[gaps == 0] = np.inf
    expected = -gaps.min(1) / np.sqrt(2 * np.sum(x**2, 1))
    calculator = WeightsBoundaryCalculator(model, show_progress=False)
    np.testing.assert_allclose(_scores(calculator, _dataset(x)), expected, rtol=1e-4, atol=1e-6)

    softmax_model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, use_bias=False, activation="softmax")])
    softmax_model.set_weights([kernel.astype(np.float32)])
    soft_scores = _scores(WeightsBoundaryCalculator(softmax_model, show_progress=False), _dataset(x))
    # Softmax keeps the arg max, so the boundary is the same set of weights: DeepFool on the probabilities
    # finds a point of it, which can be no closer than the nearest one.
    assert np.all(np.isfinite(soft_scores))
    assert np.all(-soft_scores >= -expected * (1 - 1e-4))


@pytest.mark.parametrize("calculator_type", [SampleBoundaryCalculator, WeightsBoundaryCalculator])
def test_model_weights_are_bit_identical_after_success_and_after_an_error_mid_way(calculator_type):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3)])
    before = _weights_of(model)
    calculator = calculator_type(model, show_progress=False)
    x = np.random.normal(size=(6, 3)).astype(np.float32)
    _scores(calculator, _dataset(x))
    _assert_bit_identical(before, model)

    def failing_batches():
        yield x[:3], np.zeros((3, 1), np.float32)
        raise RuntimeError("data pipeline failure")

    failing = tf.data.Dataset.from_generator(
        failing_batches,
        output_signature=(tf.TensorSpec((None, 3), tf.float32), tf.TensorSpec((None, 1), tf.float32)),
    )
    with pytest.raises(Exception, match="data pipeline failure"):
        _scores(calculator, failing)
    _assert_bit_identical(before, model)


def test_bad_arguments_raise_clear_errors():
    model = _linear_model(3, 3)
    with pytest.raises(ValueError, match="step_nbr"):
        SampleBoundaryCalculator(model, step_nbr=0)
    with pytest.raises(ValueError, match="eps"):
        SampleBoundaryCalculator(model, eps=-1.0)
    with pytest.raises(TypeError, match="keras.Model"):
        SampleBoundaryCalculator("not a model")
    with pytest.raises(ValueError, match="norm_type"):
        WeightsBoundaryCalculator(model, norm_type=1)
    no_dense_head = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3), keras.layers.Softmax()])
    with pytest.raises(ValueError, match="Dense"):
        WeightsBoundaryCalculator(no_dense_head)
    single_output = _linear_model(3, 1)
    x = np.random.normal(size=(4, 3))
    with pytest.raises(ValueError, match="at least 2 classes"):
        SampleBoundaryCalculator(single_output)
    with pytest.raises(ValueError, match="at least 2 classes"):
        WeightsBoundaryCalculator(single_output)
    with pytest.raises(ValueError, match="empty"):
        SampleBoundaryCalculator(model).compute_influence_values(_dataset(x).take(0))


@pytest.mark.parametrize("calculator_type", [SampleBoundaryCalculator, WeightsBoundaryCalculator])
def test_float64_models_get_float64_distances_to_float64_precision(calculator_type):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,), dtype="float64"), keras.layers.Dense(3, dtype="float64")])
    x = np.random.default_rng(0).normal(size=(7, 4))
    kernel, bias = (w.numpy() for w in model.weights)
    logits = x @ kernel + bias
    predicted = logits.argmax(1)
    if calculator_type is SampleBoundaryCalculator:
        expected = [
            -min(abs(row[k] - row[c]) / np.linalg.norm(kernel[:, k] - kernel[:, c]) for k in range(3) if k != c)
            for row, c in zip(logits, predicted)
        ]
    else:
        gaps = np.abs(logits - logits[np.arange(len(x)), predicted][:, None])
        gaps[np.arange(len(x)), predicted] = np.inf
        expected = -gaps.min(1) / np.sqrt(2 * (np.sum(x**2, 1) + 1))
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros((len(x), 1)))).batch(3)
    values = extract_only_values(calculator_type(model, show_progress=False).compute_influence_values(dataset))
    assert values.dtype == tf.float64
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-10)
