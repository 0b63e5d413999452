"""Every bad input to the core raises a clear exception that says what is wrong and how to fix it."""
import keras
import numpy as np
import pytest
import reference_math as rm
import tensorflow as tf

import influence_lib as il


@pytest.fixture(scope="module")
def setup():
    model, dataset, x, y = rm.softmax_regression(n=32, batch_size=8)
    return model, dataset, x, y, il.InfluenceModel(model)


def _calculator(influence_model, dataset):
    return il.FirstOrderInfluenceCalculator(influence_model, dataset, show_progress=False)


def test_reduced_keras_loss_is_rejected(setup):
    model = setup[0]
    with pytest.raises(ValueError, match="reduction=None"):
        il.InfluenceModel(model, loss_function=keras.losses.CategoricalCrossentropy())


def test_reduced_plain_callable_loss_is_rejected(setup):
    model, dataset = setup[0], setup[1]
    influence_model = il.InfluenceModel(model, loss_function=lambda y, p: tf.reduce_mean(tf.square(y - p)))
    with pytest.raises(ValueError, match="single value for the whole batch"):
        influence_model.batch_jacobian(dataset)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"start_layer": "nope"}, ValueError, "Unknown layer name 'nope'"),
        ({"start_layer": 7}, ValueError, "out of range"),
        ({"start_layer": 1.5}, TypeError, "layer name"),
    ],
)
def test_layer_selection_errors(setup, kwargs, error, match):
    with pytest.raises(error, match=match):
        il.InfluenceModel(setup[0], **kwargs)


def test_last_layer_before_start_layer_and_layers_without_weights():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.Activation("relu"), keras.layers.Dense(2)]
    )
    with pytest.raises(ValueError, match="comes before start_layer"):
        il.InfluenceModel(model, start_layer=2, last_layer=0)
    with pytest.raises(ValueError, match="have no trainable weights"):
        il.InfluenceModel(model, start_layer=1)
    assert il.InfluenceModel(model).watched_layers == [model.layers[-1]]
    assert il.InfluenceModel(model, start_layer=model.layers[0].name, last_layer=-1).nb_params == 4 * 3 + 4 + 2 * 4 + 2


def test_model_must_be_keras(setup):
    with pytest.raises(TypeError, match="keras.Model"):
        il.InfluenceModel(object())


def test_unbatched_dataset(setup):
    _, _, x, y, influence_model = setup
    unbatched = tf.data.Dataset.from_tensor_slices((x, y))
    with pytest.raises(ValueError, match=r"unbatched.*\.batch"):
        _calculator(influence_model, unbatched)
    scalars = tf.data.Dataset.from_tensor_slices((np.arange(4.0), np.arange(4.0)))
    with pytest.raises(ValueError, match="unbatched"):
        influence_model.check_dataset(scalars)


def test_empty_datasets(setup):
    _, dataset, _, _, influence_model = setup
    with pytest.raises(ValueError, match="empty"):
        _calculator(influence_model, dataset.take(0))
    calculator = _calculator(influence_model, dataset)
    filtered_empty = dataset.filter(lambda x, y: tf.reduce_sum(x) > 1e9)
    with pytest.raises(ValueError, match="empty"):
        calculator.compute_top_k_from_training_dataset(filtered_empty, 3)


def test_not_a_dataset(setup):
    _, _, x, y, influence_model = setup
    with pytest.raises(TypeError, match="tf.data.Dataset"):
        _calculator(influence_model, (x, y))


def test_batch_of_wrong_arity(setup):
    _, _, x, y, influence_model = setup
    four = tf.data.Dataset.from_tensor_slices((x, y, y, y)).batch(8)
    with pytest.raises(ValueError, match="process_batch_for_loss_fn"):
        influence_model.batch_jacobian(four)


def test_inputs_of_the_wrong_shape(setup):
    _, dataset, _, _, influence_model = setup
    calculator = _calculator(influence_model, dataset)
    wrong = tf.data.Dataset.from_tensor_slices((np.zeros((8, 5), np.float32), np.zeros((8, 3), np.float32))).batch(4)
    with pytest.raises(ValueError, match="the model expects inputs of shape"):
        calculator.compute_top_k_from_training_dataset(wrong, 2)


def test_non_finite_gradients_name_the_samples(setup):
    _, dataset, x, y, influence_model = setup
    calculator = _calculator(influence_model, dataset)
    poisoned = x.copy()
    poisoned[5, 0] = np.nan
    bad = tf.data.Dataset.from_tensor_slices((poisoned, y)).batch(8)
    with pytest.raises(il.NonFiniteError, match=r"starting at sample 0.*rows \[5\]"):
        calculator.compute_top_k_from_training_dataset(bad, 2)
    shifted = tf.data.Dataset.from_tensor_slices((poisoned, y)).skip(1).batch(2)
    with pytest.raises(il.NonFiniteError, match=r"starting at sample 4.*rows \[0\]"):
        calculator.compute_top_k_from_training_dataset(shifted, 2)
    with pytest.raises(il.NonFiniteError, match="NaN"):
        _calculator(influence_model, bad)


def test_top_k_and_cache_arguments(setup):
    _, dataset, _, _, influence_model = setup
    calculator = _calculator(influence_model, dataset)
    with pytest.raises(ValueError, match="positive integer"):
        calculator.top_k(dataset, dataset, k=0)
    with pytest.raises(TypeError, match="ORDER"):
        calculator.compute_top_k_from_training_dataset(dataset, 2, order="descending")
    with pytest.raises(TypeError, match="CACHE"):
        calculator.top_k(dataset, dataset, influence_vector_in_cache="memory")
    with pytest.raises(TypeError, match="ihvp_calculator"):
        il.FirstOrderInfluenceCalculator(influence_model, dataset, ihvp_calculator=3, show_progress=False)


def test_ihvp_built_for_another_model_is_rejected(setup):
    model, dataset, _, _, influence_model = setup
    other = il.InfluenceModel(model)
    ihvp = il.ExactIHVP(other, dataset, show_progress=False)
    with pytest.raises(ValueError, match="another InfluenceModel"):
        il.FirstOrderInfluenceCalculator(influence_model, dataset, ihvp_calculator=ihvp)


def test_user_model_and_data_are_not_modified(setup):
    model, dataset, x, y, influence_model = setup
    before = [w.numpy().copy() for w in model.weights]
    x_before = x.copy()
    calculator = il.FirstOrderInfluenceCalculator(influence_model, dataset, ihvp_calculator="cgd", show_progress=False)
    list(calculator.top_k(dataset, dataset, k=2))
    for old, new in zip(before, model.weights):
        np.testing.assert_array_equal(old, new.numpy())
    np.testing.assert_array_equal(x, x_before)


def test_compiled_methods_work_on_a_temporary_influence_model(setup):
    _, dataset, x, y, influence_model = setup
    batch = next(iter(dataset))
    np.testing.assert_array_equal(
        il.InfluenceModel(setup[0]).batch_jacobian_tensor(batch).numpy(), influence_model.batch_jacobian_tensor(batch).numpy()
    )
