"""Bad data reaching the loss or the pipeline: a clear ValueError at the first batch, never a silent wrong answer."""
import keras
import numpy as np
import pytest
import reference_math as rm
import tensorflow as tf

import influence_lib as il
from influence_lib.common.datasets import check_fixed_order


@pytest.fixture(scope="module")
def setup():
    model, train, x, y = rm.softmax_regression(n=24, d=4, c=3, seed=2, batch_size=8)
    return model, train, x, y


def _cross_entropy(targets, probabilities):
    return keras.losses.categorical_crossentropy(targets, probabilities)


# --- the per-sample loss must have one value per sample ------------------------------------------------------


@pytest.mark.parametrize(
    "loss, count",
    [
        (lambda t, p: tf.reduce_sum(_cross_entropy(t, p), keepdims=True), 1),  # reduced with keepdims: (1,)
        (lambda t, p: tf.reshape(-t * tf.math.log(p), [-1]), 24),  # batch × classes values, flattened
        (lambda t, p: _cross_entropy(t, p)[:4], 4),  # fewer values than samples
        (lambda t, p: tf.concat([_cross_entropy(t, p), _cross_entropy(t, p)], 0), 16),
    ],
)
@pytest.mark.parametrize("entry", ["batch_loss", "batch_jacobian", "batch_gradient", "first_order", "tracin_self"])
def test_loss_without_one_value_per_sample_is_refused_at_the_first_batch(setup, loss, count, entry):
    model, train = setup[0], setup[1]
    influence_model = il.InfluenceModel(model, loss_function=loss)
    calls = {
        "batch_loss": lambda: influence_model.batch_loss(train),
        "batch_jacobian": lambda: influence_model.batch_jacobian(train),
        "batch_gradient": lambda: influence_model.batch_gradient(train),
        "first_order": lambda: il.FirstOrderInfluenceCalculator(influence_model, train, show_progress=False),
        "tracin_self": lambda: il.TracIn([influence_model], 0.1, show_progress=False).compute_top_k_from_training_dataset(train, 2),
    }
    with pytest.raises(ValueError, match=rf"returned {count} values for a batch of 8 samples.*one value per sample"):
        calls[entry]()


def test_loss_shape_is_checked_when_the_batch_size_is_only_known_at_run_time(setup):
    model, _, x, y = setup
    influence_model = il.InfluenceModel(model, loss_function=lambda t, p: tf.reduce_sum(_cross_entropy(t, p), keepdims=True))
    single = tf.data.Dataset.from_tensor_slices((x[:1], y[:1])).batch(1)
    np.testing.assert_allclose(influence_model.batch_loss(single).numpy(), -np.log((model(x[:1]).numpy() * y[:1]).sum(1)),
                               rtol=1e-5)  # one sample: (1,) is one value per sample
    for size in (3, 5, 6):  # varying batch sizes: traced with an unknown batch dimension
        dataset = tf.data.Dataset.from_tensor_slices((x[:size], y[:size])).batch(size)
        with pytest.raises(ValueError, match=f"returned 1 values for a batch of {size} samples"):
            influence_model.batch_loss(dataset)


def test_per_element_losses_are_averaged_per_sample(setup):
    model, train, x, y = setup
    per_class = il.InfluenceModel(model, loss_function=lambda t, p: -t * tf.math.log(p))  # (batch, classes)
    probabilities = model(x).numpy().astype(np.float64)
    expected = (-y * np.log(probabilities)).mean(axis=1)
    np.testing.assert_allclose(per_class.batch_loss(train).numpy(), expected, rtol=1e-5)
    kernel, bias = [w.numpy() for w in per_class.weights]
    np.testing.assert_allclose(per_class.batch_jacobian(train).numpy(), rm.softmax_gradients(x, y, kernel, bias) / 3,
                               rtol=1e-4, atol=1e-6)


# --- sample weights ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(24, 2), (24, 3), (24, 1, 2)])
def test_sample_weight_without_one_value_per_sample_is_refused(setup, shape):
    model, _, x, y = setup
    dataset = tf.data.Dataset.from_tensor_slices((x, y, np.ones(shape, np.float32))).batch(8)
    with pytest.raises(ValueError, match=r"sample weight has shape .* for a batch of 8 samples.*one weight per sample"):
        il.InfluenceModel(model).batch_jacobian(dataset)


def test_sample_weight_of_shape_batch_by_one_is_accepted(setup):
    model, _, x, y = setup
    weights = np.linspace(0.5, 2.0, 24).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((x, y, weights[:, None])).batch(8)
    kernel, bias = [w.numpy() for w in il.InfluenceModel(model).weights]
    np.testing.assert_allclose(il.InfluenceModel(model).batch_jacobian(dataset).numpy(),
                               weights[:, None] * rm.softmax_gradients(x, y, kernel, bias), rtol=1e-4, atol=1e-6)


# --- sparse labels -------------------------------------------------------------------------------------------


def _sparse(setup, labels, batch_size=8):
    return tf.data.Dataset.from_tensor_slices((setup[2], np.asarray(labels, np.int64))).batch(batch_size)


@pytest.mark.parametrize("bad", [7, 3, -1, -5])
@pytest.mark.parametrize("entry", ["batch_loss", "batch_jacobian", "first_order", "tracin"])
def test_sparse_label_out_of_range_names_label_and_classes(setup, bad, entry):
    labels = np.arange(24) % 3
    labels[13] = bad
    dataset = _sparse(setup, labels)
    influence_model = il.InfluenceModel(setup[0], loss_function=keras.losses.SparseCategoricalCrossentropy(reduction=None))
    calls = {
        "batch_loss": lambda: influence_model.batch_loss(dataset),
        "batch_jacobian": lambda: influence_model.batch_jacobian(dataset),
        "first_order": lambda: il.FirstOrderInfluenceCalculator(influence_model, dataset, show_progress=False),
        "tracin": lambda: list(il.TracIn([influence_model], 0.1, show_progress=False).compute_influence_values(dataset)),
    }
    with pytest.raises(ValueError, match=rf"label is out of range: got label {bad} for a model with 3 classes.*0 to 2"):
        calls[entry]()


def test_sparse_labels_in_range_give_the_one_hot_values(setup):
    labels = np.arange(24) % 3
    sparse = il.InfluenceModel(setup[0], loss_function=keras.losses.SparseCategoricalCrossentropy(reduction=None))
    kernel, bias = [w.numpy() for w in sparse.weights]
    np.testing.assert_allclose(sparse.batch_jacobian(_sparse(setup, labels[:, None])).numpy(),
                               rm.softmax_gradients(setup[2], np.eye(3)[labels], kernel, bias), rtol=1e-4, atol=1e-6)


# --- reshuffling and random pipelines ------------------------------------------------------------------------


def _pipelines(x, y):
    base = tf.data.Dataset.from_tensor_slices((x, y))
    return {
        "shuffle default": base.shuffle(24).batch(8),
        "shuffle seeded but reshuffled": base.shuffle(24, seed=1).batch(8),
        "shuffle after batch": base.batch(8).shuffle(3),
        "random augmentation": base.batch(8).map(lambda a, b: (a + tf.random.uniform(tf.shape(a)), b)),
        "nondeterministic parallel map": base.batch(8).map(lambda a, b: (a, b), num_parallel_calls=2, deterministic=False),
        "options": base.batch(8).with_options(_nondeterministic()),
    }


def _nondeterministic():
    options = tf.data.Options()
    options.deterministic = False
    return options


@pytest.mark.parametrize("name", list(_pipelines(np.zeros((2, 4), np.float32), np.zeros((2, 3), np.float32))))
def test_training_set_that_changes_between_passes_is_refused_with_the_fix(setup, name):
    model, _, x, y = setup
    train = _pipelines(x, y)[name]
    calculator = il.TracIn([il.InfluenceModel(model)], 0.1, show_progress=False)
    test = tf.data.Dataset.from_tensor_slices((x[:4], y[:4])).batch(2)
    for call in (
        lambda: calculator.compute_top_k_from_training_dataset(train, 3),
        lambda: calculator.compute_influence_values(train),
        lambda: list(calculator.top_k(test, train, k=2)),
        lambda: calculator.estimate_influence_values_in_batches(test, train),
        lambda: calculator.compute_influence_vector(train),
    ):
        with pytest.raises(ValueError, match="train_set does not iterate in a fixed order.*reshuffle_each_iteration=False"):
            call()


def test_a_fixed_shuffle_is_accepted_and_indices_point_at_the_returned_samples(setup):
    model, _, x, y = setup
    train = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(24, seed=3, reshuffle_each_iteration=False).batch(8)
    check_fixed_order(train)
    order = np.concatenate([batch[0].numpy() for batch in train])
    kernel, bias = [w.numpy() for w in il.InfluenceModel(model).weights]
    labels = np.concatenate([batch[1].numpy() for batch in train])
    self_influence = 0.1 * (rm.softmax_gradients(order, labels, kernel, bias) ** 2).sum(axis=1)
    samples, values, indices = il.TracIn([il.InfluenceModel(model)], 0.1, show_progress=False).compute_top_k_from_training_dataset(train, 5)
    np.testing.assert_array_equal(indices.numpy(), np.argsort(-self_influence)[:5])
    np.testing.assert_allclose(samples.numpy(), order[indices.numpy()])
    np.testing.assert_allclose(values.numpy(), self_influence[indices.numpy()], rtol=1e-4)


def test_evaluation_sets_may_be_shuffled(setup):
    model, train, x, y = setup
    test = tf.data.Dataset.from_tensor_slices((x[:6], y[:6])).shuffle(6).batch(3)
    results = list(il.TracIn([il.InfluenceModel(model)], 0.1, show_progress=False).top_k(test, train, k=2))
    assert sum(int(row[0][0].shape[0]) for row in results) == 6


# --- infinite datasets ---------------------------------------------------------------------------------------


def test_infinite_dataset_is_refused_by_every_constructor_and_method(setup):
    model, train, x, y = setup
    infinite = train.repeat()
    influence_model = il.InfluenceModel(model)
    message = r"infinite \(tf.data.INFINITE_CARDINALITY.*\.repeat\(count\) or \.take\(n\)"
    constructors = [
        lambda: il.FirstOrderInfluenceCalculator(influence_model, infinite, show_progress=False),
        lambda: il.ArnoldiInfluenceCalculator(influence_model, infinite, subspace_dim=4, show_progress=False),
        lambda: il.ExactIHVP(influence_model, infinite),
        lambda: il.ConjugateGradientDescentIHVP(influence_model, infinite),
        lambda: il.LissaIHVP(influence_model, infinite),
        lambda: il.RepresenterPointL2(model, infinite, keras.losses.CategoricalCrossentropy(reduction=None), 0.01),
        lambda: il.RepresenterPointLJE(influence_model, infinite, il.ExactIHVPFactory(), show_progress=False),
        lambda: influence_model.batch_jacobian(infinite),
    ]
    for construct in constructors:
        with pytest.raises(ValueError, match=message):
            construct()
    calculators = [
        il.FirstOrderInfluenceCalculator(influence_model, train, show_progress=False),
        il.TracIn([influence_model], 0.1, show_progress=False),
        il.SampleBoundaryCalculator(model, step_nbr=2, show_progress=False),
        il.WeightsBoundaryCalculator(model, step_nbr=2, show_progress=False),
    ]
    for calculator in calculators:
        with pytest.raises(ValueError, match=message):
            calculator.compute_top_k_from_training_dataset(infinite, 2)
        with pytest.raises(ValueError, match=message):
            calculator.compute_influence_values(infinite)
    with pytest.raises(ValueError, match=message):
        list(calculators[0].top_k(infinite, train, k=1))
    with pytest.raises(ValueError, match=message):
        list(calculators[0].top_k(train, infinite, k=1))


@pytest.mark.parametrize("cache", [il.CACHE.MEMORY, il.CACHE.DISK])
def test_a_generator_that_reshuffles_is_caught_when_cached_vectors_are_replayed(setup, cache):
    model, _, x, y = setup
    rng = np.random.default_rng(0)

    def reshuffled():
        for index in rng.permutation(len(x)):
            yield x[index], y[index]

    spec = (tf.TensorSpec((4,), tf.float32), tf.TensorSpec((3,), tf.float32))
    train = tf.data.Dataset.from_generator(reshuffled, output_signature=spec).batch(8)
    test = tf.data.Dataset.from_tensor_slices((x[:4], y[:4])).batch(2)
    calculator = il.TracIn([il.InfluenceModel(model)], 0.1, show_progress=False)
    with pytest.raises(ValueError, match="(other samples or another order|different setup: data).*reshuffle"):
        list(calculator.top_k(test, train, k=2, influence_vector_in_cache=cache))
