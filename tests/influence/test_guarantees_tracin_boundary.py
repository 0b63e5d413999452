"""TracIn checkpoints, boundary methods and iteration counts under bad input: clear errors, never silent sums."""
import os

import keras
import numpy as np
import pytest
import reference_math as rm
import tensorflow as tf

import influence_lib as il
from influence_lib.influence.base import extract_only_values
from influence_lib.influence.tracin_checkpoint import TracInCheckpoint, load_checkpoint


def _mlp(width=4, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(width, activation="tanh"),
                              keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
    return model


def _data(n=12):
    x = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[(x[:, 0] > 0).astype(int)]
    return x, y, tf.data.Dataset.from_tensor_slices((x, y)).batch(4)


# --- TracIn: checkpoints of one run --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "second, match",
    [
        (lambda: il.InfluenceModel(_mlp(width=5)), r"Checkpoint 1 watches weights of shapes \[\(5, 2\), \(2,\)\]"),
        (lambda: il.InfluenceModel(_mlp(), start_layer=0, last_layer=1), "Checkpoint 1 watches weights of shapes"),
        (lambda: il.InfluenceModel(_mlp(), loss_function=keras.losses.MeanSquaredError(reduction=None)),
         "Checkpoint 1 uses the loss MeanSquaredError"),
    ],
)
def test_tracin_refuses_checkpoints_of_other_architectures_layers_or_losses(second, match):
    with pytest.raises(ValueError, match=match):
        il.TracIn([il.InfluenceModel(_mlp()), second()], 0.1, show_progress=False)


def test_tracin_from_checkpoints_of_another_architecture_names_the_file(tmp_path):
    narrow = _mlp(width=4)
    wide_path = str(tmp_path / "wide.weights.h5")
    _mlp(width=6).save_weights(wide_path)
    with pytest.raises(ValueError, match=rf"Cannot load the TracIn checkpoint '{wide_path}'.*another architecture"):
        il.TracIn.from_checkpoints(narrow, [wide_path], 0.1, show_progress=False)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing", "directory"])
def test_corrupt_or_missing_checkpoint_names_its_path(tmp_path, damage):
    model = _mlp()
    good = str(tmp_path / "good.weights.h5")
    model.save_weights(good)
    bad = str(tmp_path / "bad.weights.h5")
    if damage == "garbage":
        with open(bad, "wb") as handle:
            handle.write(b"not an h5 file" * 20)
    elif damage == "truncated":
        data = open(good, "rb").read()
        with open(bad, "wb") as handle:
            handle.write(data[: len(data) // 2])
    elif damage == "directory":
        os.mkdir(bad)
    error = FileNotFoundError if damage in ("missing", "directory") else ValueError
    with pytest.raises(error, match=f"TracIn checkpoint '{bad}'"):
        il.TracIn.from_checkpoints(model, [good, bad], 0.1, show_progress=False)


def test_loaded_checkpoint_holds_the_saved_weights_and_the_model_is_untouched(tmp_path):
    model, other = _mlp(seed=0), _mlp(seed=1)
    path = str(tmp_path / "other.weights.h5")
    other.save_weights(path)
    before = [w.copy() for w in model.get_weights()]
    clone = load_checkpoint(keras.models.clone_model(model), path)
    for loaded, saved in zip(clone.get_weights(), other.get_weights()):
        np.testing.assert_array_equal(loaded, saved)
    for kept, original in zip(model.get_weights(), before):
        np.testing.assert_array_equal(kept, original)


def test_two_callback_runs_in_one_directory_keep_their_own_files(tmp_path):
    x, y, train = _data()
    directory = str(tmp_path / "checkpoints")
    first_model, second_model = _mlp(seed=0), _mlp(seed=1)
    first, second = TracInCheckpoint(directory), TracInCheckpoint(directory)
    first_model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[first])
    first_weights = [w.copy() for w in first_model.get_weights()]
    first_values = extract_only_values(_tracin_values(first, first_model, train))
    second_model.fit(x + 1.0, y, batch_size=4, epochs=3, verbose=0, callbacks=[second])
    assert first.run_directory != second.run_directory
    assert set(first.paths).isdisjoint(second.paths) and len(first.paths) == 2 and len(second.paths) == 3
    assert all(os.path.dirname(path) == first.run_directory for path in first.paths)
    np.testing.assert_array_equal(extract_only_values(_tracin_values(first, first_model, train)), first_values)
    # The last checkpoint of the first run still holds the first run's final weights.
    last = load_checkpoint(keras.models.clone_model(first_model), first.paths[-1])
    for loaded, expected in zip(last.get_weights(), first_weights):
        np.testing.assert_array_equal(loaded, expected)
    assert not [name for name in os.listdir(first.run_directory) if name.startswith(".tmp-")]


def _tracin_values(callback, model, train):
    return il.TracIn.from_callback(callback, model, show_progress=False).compute_influence_values(train)


def test_callback_directory_problems_are_reported_at_construction(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match=f"TracInCheckpoint directory '{a_file}' is a file"):
        TracInCheckpoint(str(a_file))
    with pytest.raises(OSError, match="Cannot create the TracInCheckpoint directory"):
        TracInCheckpoint(str(a_file / "below"))
    assert a_file.read_text() == "x"


# --- boundary methods ----------------------------------------------------------------------------------------


def _classifier():
    model, train, x, y = rm.softmax_regression(n=12, d=4, c=3, seed=1, batch_size=4)
    return model, train


@pytest.mark.parametrize("calculator_type", [il.SampleBoundaryCalculator, il.WeightsBoundaryCalculator])
@pytest.mark.parametrize("eps", [float("nan"), float("inf"), -1e-3, "1e-6", True])
def test_boundary_eps_must_be_finite_and_non_negative(calculator_type, eps):
    with pytest.raises(ValueError, match="eps must be a finite non-negative number"):
        calculator_type(_classifier()[0], eps=eps, show_progress=False)


@pytest.mark.parametrize("calculator_type", [il.SampleBoundaryCalculator, il.WeightsBoundaryCalculator])
@pytest.mark.parametrize("where", ["kernel", "bias", "input"])
def test_nan_weights_or_inputs_raise_instead_of_zero_distances(calculator_type, where):
    model, train = _classifier()
    model = keras.models.clone_model(model)
    model.set_weights(_classifier()[0].get_weights())
    if where == "kernel":
        model.layers[-1].kernel.assign(np.full((4, 3), np.nan, np.float32))
    elif where == "bias":
        model.layers[-1].bias.assign(np.array([0.0, np.nan, 0.0], np.float32))
    else:
        x = np.concatenate([b[0].numpy() for b in train])
        x[5, 2] = np.nan
        y = np.concatenate([b[1].numpy() for b in train])
        train = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    calculator = calculator_type(model, step_nbr=3, show_progress=False)
    match = r"outputs are NaN or infinite for the samples at positions \[1\]" if where == "input" else "NaN or infinite"
    with pytest.raises(il.NonFiniteError, match=match):
        calculator.compute_top_k_from_training_dataset(train, 3)


@pytest.mark.parametrize("calculator_type", [il.SampleBoundaryCalculator, il.WeightsBoundaryCalculator])
def test_multi_output_models_are_refused_with_the_fix(calculator_type):
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(5, activation="relu")(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(3, activation="softmax")(hidden),
                                 keras.layers.Dense(2, activation="softmax")(hidden)])
    with pytest.raises(ValueError, match=r"single output, but the model has 2 outputs.*model.outputs\[i\]"):
        calculator_type(model, show_progress=False)


def test_one_head_of_a_multi_output_model_scores_like_that_head_alone():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(5, activation="tanh")(inputs)
    first = keras.layers.Dense(3)(hidden)
    model = keras.Model(inputs, [first, keras.layers.Dense(2)(hidden)])
    head = keras.Model(model.inputs, model.outputs[0])
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    train = tf.data.Dataset.from_tensor_slices((x, np.zeros((8, 3), np.float32))).batch(4)
    values = extract_only_values(il.WeightsBoundaryCalculator(head, show_progress=False).compute_influence_values(train))
    # Analytic distance of a linear head (no activation): min_k |z_k − z_c| / √(2(‖f‖² + 1)).
    features = np.tanh(x @ model.layers[1].kernel.numpy() + model.layers[1].bias.numpy()).astype(np.float64)
    logits = features @ first_kernel(model) + model.layers[2].bias.numpy()
    top = logits.max(axis=1, keepdims=True)
    gaps = np.where(logits == top, np.inf, top - logits).min(axis=1)
    expected = -gaps / np.sqrt(2 * ((features ** 2).sum(axis=1) + 1))
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-4, atol=1e-6)


def first_kernel(model):
    return model.layers[2].kernel.numpy().astype(np.float64)


# --- counts and damping --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def softmax():
    model, train, _, _ = rm.softmax_regression(n=16, batch_size=8)
    return il.InfluenceModel(model), train


@pytest.mark.parametrize("count", [2.7, 2.0, "3", 0, -1, True, None])
@pytest.mark.parametrize("solver", [il.ConjugateGradientDescentIHVP, il.LissaIHVP])
def test_iteration_counts_must_be_integers_not_truncated(softmax, solver, count):
    with pytest.raises(ValueError, match=rf"n_opt_iters must be a positive integer.*got {count!r}"):
        solver(*softmax, n_opt_iters=count)


def test_numpy_integer_counts_are_accepted(softmax):
    assert il.ConjugateGradientDescentIHVP(*softmax, n_opt_iters=np.int64(3)).n_opt_iters == 3


@pytest.mark.parametrize(
    "build",
    [
        lambda model, train: il.ArnoldiInfluenceCalculator(model, train, subspace_dim=3.5, show_progress=False),
        lambda model, train: il.ArnoldiInfluenceCalculator(model, train, subspace_dim=4, k_largest_eig_vals=2.0,
                                                           show_progress=False),
        lambda model, train: il.FirstOrderInfluenceCalculator(model, train, n_samples_for_hessian=10.5,
                                                              show_progress=False),
        lambda model, train: il.SampleBoundaryCalculator(model.model, step_nbr=2.5),
        lambda model, train: TracInCheckpoint("unused", every_n_epochs=1.5),
        lambda model, train: il.TracIn([model], 0.1, show_progress=False).compute_top_k_from_training_dataset(train, 2.0),
    ],
)
def test_other_counts_refuse_floats(softmax, build):
    with pytest.raises(ValueError, match="must be a positive integer"):
        build(*softmax)


@pytest.mark.parametrize("damping", [float("inf"), float("nan"), -0.1])
@pytest.mark.parametrize("solver", [il.ExactIHVP, il.ConjugateGradientDescentIHVP])
def test_infinite_or_negative_damping_is_named_as_the_problem(softmax, solver, damping):
    with pytest.raises(ValueError, match=r"damping must be a finite number ≥ 0"):
        solver(*softmax, damping=damping)


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), 0.0, -1.0, "large"])
def test_lissa_scale_must_be_finite_and_positive(softmax, scale):
    with pytest.raises(ValueError, match=r"scale must be a finite number > 0 or 'auto'"):
        il.LissaIHVP(*softmax, scale=scale)


def test_shuffle_buffer_size_must_be_an_integer(softmax):
    with pytest.raises(ValueError, match="shuffle_buffer_size must be a positive integer"):
        il.FirstOrderInfluenceCalculator(*softmax, n_samples_for_hessian=8, shuffle_buffer_size=100.5,
                                         show_progress=False)


@pytest.mark.parametrize("frozen", ["whole model", "every layer"])
def test_a_fully_frozen_model_is_told_to_unfreeze_not_to_build(frozen):
    model = _mlp()
    if frozen == "whole model":
        model.trainable = False
    else:
        for layer in model.layers:
            layer.trainable = False
    with pytest.raises(ValueError, match=r"frozen \(trainable=False\).*trainable = True"):
        il.InfluenceModel(model)
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="Build the model"):
        il.InfluenceModel(unbuilt)
