"""First-order influence, RelatIF, top-k and caching against float64 NumPy closed forms."""
import numpy as np
import pytest
import reference_math as rm
import tensorflow as tf

import influence_lib as il


@pytest.fixture(scope="module")
def problem():
    model, train, x, y = rm.softmax_regression(n=64, d=4, c=3, seed=5, batch_size=16)
    influence_model = il.InfluenceModel(model)
    kernel, bias = [w.numpy() for w in influence_model.weights]
    rng = np.random.default_rng(9)
    x_test = rng.normal(size=(10, 4)).astype(np.float32)
    y_test = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 10)]
    test = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(4)
    inverse = rm.pseudo_inverse(rm.softmax_hessian(x, kernel, bias))
    g_train = rm.softmax_gradients(x, y, kernel, bias)
    g_test = rm.softmax_gradients(x_test, y_test, kernel, bias)
    return {
        "model": influence_model,
        "train": train,
        "test": test,
        "x": x,
        "pairwise": g_test @ inverse @ g_train.T,
        "relatif": (g_test @ inverse @ g_train.T) / np.linalg.norm(g_train @ inverse, axis=1),
        "self": np.einsum("np,pq,nq->n", g_train, inverse, g_train),
        "self_relatif": np.einsum("np,pq,nq->n", g_train, inverse, g_train) / np.linalg.norm(g_train @ inverse, axis=1),
    }


def _calculator(problem, **kwargs):
    # The references use the pseudo-inverse of the Hessian: damping 0 (Influenciae's behaviour), not the default.
    kwargs.setdefault("ihvp_calculator", il.ExactIHVPFactory(damping=0.0, show_progress=False))
    return il.FirstOrderInfluenceCalculator(problem["model"], problem["train"], show_progress=False, **kwargs)


def _pairwise_matrix(batches) -> np.ndarray:
    rows = []
    for _, inner in batches:
        rows.append(np.concatenate([values.numpy() for _, values in inner], axis=1))
    return np.concatenate(rows, axis=0)


def _close(actual, expected, rtol=2e-3):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("normalize, key", [(False, "self"), (True, "self_relatif")])
def test_self_influence(problem, normalize, key):
    calculator = _calculator(problem, normalize=normalize)
    result = calculator.compute_influence_values(problem["train"])
    batches = list(result)
    assert batches[0][1].shape == (16,)
    np.testing.assert_array_equal(batches[0][0][0].numpy(), problem["x"][:16])
    _close(il.extract_only_values(result).numpy(), problem[key])


@pytest.mark.parametrize("normalize, key", [(False, "pairwise"), (True, "relatif")])
@pytest.mark.parametrize("cache", [il.CACHE.MEMORY, il.CACHE.DISK, il.CACHE.NO_CACHE])
def test_pairwise_influence_in_batches(problem, normalize, key, cache):
    calculator = _calculator(problem, normalize=normalize)
    batches = calculator.estimate_influence_values_in_batches(problem["test"], problem["train"], cache)
    _close(_pairwise_matrix(batches), problem[key])
    _close(_pairwise_matrix(batches), problem[key])  # re-iterable


def test_cg_and_exact_agree_on_pairwise_values(problem):
    calculator = _calculator(
        problem, ihvp_calculator=il.ConjugateGradientDescentIHVP(problem["model"], problem["train"], n_opt_iters=200, damping=0.0)
    )
    _close(_pairwise_matrix(calculator.estimate_influence_values_in_batches(problem["test"], problem["train"])),
           problem["pairwise"], rtol=1e-2)


@pytest.mark.parametrize("order", [il.ORDER.DESCENDING, il.ORDER.ASCENDING])
def test_top_k_per_test_sample_with_indices(problem, order):
    calculator = _calculator(problem)
    k = 5
    expected = problem["pairwise"]
    ranking = np.argsort(-expected if order == il.ORDER.DESCENDING else expected, axis=1, kind="stable")[:, :k]
    rows = list(calculator.top_k(problem["test"], problem["train"], k=k, order=order))
    indices = np.concatenate([row[3].numpy() for row in rows])
    values = np.concatenate([row[1].numpy() for row in rows])
    samples = np.concatenate([row[2].numpy() for row in rows])
    np.testing.assert_array_equal(indices, ranking)
    _close(values, np.take_along_axis(expected, ranking, axis=1))
    np.testing.assert_array_equal(samples, problem["x"][ranking])


@pytest.mark.parametrize("order", [il.ORDER.DESCENDING, il.ORDER.ASCENDING])
def test_top_k_of_self_influence(problem, order):
    calculator = _calculator(problem)
    expected = problem["self"]
    ranking = np.argsort(-expected if order == il.ORDER.DESCENDING else expected, kind="stable")[:7]
    samples, values, indices = calculator.compute_top_k_from_training_dataset(problem["train"], 7, order)
    np.testing.assert_array_equal(indices.numpy(), ranking)
    _close(values.numpy(), expected[ranking])
    np.testing.assert_array_equal(samples.numpy(), problem["x"][ranking])


def test_top_k_larger_than_training_set_returns_everything(problem):
    samples, values, indices = _calculator(problem).compute_top_k_from_training_dataset(problem["train"], 100)
    assert sorted(indices.numpy().tolist()) == list(range(64))


def test_disk_cache_roundtrip_and_mismatch(problem, tmp_path):
    calculator = _calculator(problem)
    path = str(tmp_path / "vectors")
    saved = list(calculator.compute_influence_vector(problem["train"], save_influence_vector_ds_path=path))
    assert saved[0][1].shape == (16, problem["model"].nb_params)
    batches = calculator.estimate_influence_values_in_batches(
        problem["test"], problem["train"], il.CACHE.DISK, load_influence_vector_path=path
    )
    _close(_pairwise_matrix(batches), problem["pairwise"])
    top = list(calculator.top_k(problem["test"], problem["train"], k=3, load_influence_vector_ds_path=path))
    np.testing.assert_array_equal(
        np.concatenate([row[3].numpy() for row in top]), np.argsort(-problem["pairwise"], axis=1)[:, :3]
    )
    with pytest.raises(ValueError, match="different setup"):
        _calculator(problem, normalize=True).top_k(problem["test"], problem["train"], load_influence_vector_ds_path=path)
    smaller = problem["train"].take(2)
    with pytest.raises(ValueError, match="different setup: data"):
        calculator.top_k(problem["test"], smaller, load_influence_vector_ds_path=path)
    with pytest.raises(FileNotFoundError, match="No influence-vector cache"):
        calculator.top_k(problem["test"], problem["train"], load_influence_vector_ds_path=str(tmp_path / "missing"))


def test_saved_influence_values_are_read_back(problem, tmp_path):
    calculator = _calculator(problem)
    batches = calculator.estimate_influence_values_in_batches(
        problem["test"], problem["train"], save_influence_value_path=str(tmp_path / "values")
    )
    assert (tmp_path / "values" / "batch_000002").exists()
    _close(_pairwise_matrix(batches), problem["pairwise"])


def test_hessian_subset_is_fixed_and_of_requested_size(problem):
    calculator = _calculator(problem, n_samples_for_hessian=40)
    first = np.concatenate([b[0].numpy() for b in calculator.train_set])
    second = np.concatenate([b[0].numpy() for b in calculator.train_set])
    assert first.shape == (40, 4)
    np.testing.assert_array_equal(first, second)
    with pytest.raises(ValueError, match="n_samples_for_hessian"):
        _calculator(problem, n_samples_for_hessian=0)


def test_sample_weights_scale_gradients(problem):
    calculator = _calculator(problem)
    weights = np.linspace(0.5, 2.0, 64).astype(np.float32)
    weighted = tf.data.Dataset.from_tensor_slices(
        (problem["x"], np.concatenate([b[1].numpy() for b in problem["train"]]), weights)
    ).batch(16)
    values = il.extract_only_values(calculator.compute_influence_values(weighted)).numpy()
    _close(values, problem["self"] * weights**2)
