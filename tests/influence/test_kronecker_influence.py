"""KroneckerInfluenceCalculator (queries preconditioned, query batching) and per-layer scores, against NumPy."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import influence_lib as il

DAMPING = 1e-2


def _mlp_problem(seed=0, n=20, d=4, h=5, c=3):
    rng = np.random.default_rng(seed)
    model = keras.Sequential([
        keras.Input((d,)), keras.layers.Dense(h, activation="tanh"), keras.layers.Dense(c, activation="softmax")
    ])
    model.set_weights([rng.normal(scale=0.8, size=w.shape).astype(np.float32) for w in model.get_weights()])
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = np.eye(c, dtype=np.float32)[rng.integers(0, c, n)]
    influence_model = il.InfluenceModel(model, start_layer=0, last_layer=1)
    return influence_model, tf.data.Dataset.from_tensor_slices((x, y)).batch(8), (x, y)


def _conv_problem(seed=1, n=12):
    rng = np.random.default_rng(seed)
    model = keras.Sequential([
        keras.Input((5, 5, 2)),
        keras.layers.Conv2D(3, 3, padding="same", activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax"),
    ])
    x = rng.normal(size=(n, 5, 5, 2)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, n)]
    influence_model = il.InfluenceModel(model, start_layer=0, last_layer=2)
    return influence_model, tf.data.Dataset.from_tensor_slices((x, y)).batch(6), (x, y)


def _block_inverse(ihvp) -> np.ndarray:
    """Dense ``(F̂ + λ)⁻¹``, block-diagonal over layers, from the factors (NumPy float64)."""
    blocks = []
    for factors, lam, block in zip(ihvp.factors, ihvp.layer_damping, ihvp.blocks):
        basis = np.kron(factors.a_eigenvectors, factors.s_eigenvectors)
        inverse = basis @ np.diag(1.0 / (factors.eigenvalues.reshape(-1) + lam)) @ basis.T
        kernel_rows = block.input_dim - 1
        kernel_first = np.arange(kernel_rows * block.output_dim)
        order = np.concatenate([kernel_first, kernel_rows * block.output_dim + np.arange(block.output_dim)])
        blocks.append(inverse[np.ix_(order, order)])
    size = sum(len(b) for b in blocks)
    dense, start = np.zeros((size, size)), 0
    for b in blocks:
        dense[start : start + len(b), start : start + len(b)] = b
        start += len(b)
    return dense


def _pairwise(calculator, queries, train_set):
    batches = calculator.estimate_influence_values_in_batches(
        tf.data.Dataset.from_tensor_slices(queries).batch(len(queries[0])), train_set
    )
    return np.concatenate([np.concatenate([v.numpy() for _, v in values], axis=1) for _, values in batches])


def test_preconditioned_queries_equal_numpy_block_diagonal_influence():
    model, dataset, (x, y) = _mlp_problem()
    calculator = il.KroneckerInfluenceCalculator(
        model, dataset, il.KFACIHVPFactory(damping=DAMPING, corrected_eigenvalues=True, show_progress=False),
        show_progress=False,
    )
    gradients = model.batch_jacobian_tensor((x, y)).numpy().astype(np.float64)
    expected = gradients[:5] @ _block_inverse(calculator.ihvp_calculator) @ gradients.T
    result = _pairwise(calculator, (x[:5], y[:5]), dataset)
    np.testing.assert_allclose(result, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    first_order = il.FirstOrderInfluenceCalculator(model, dataset, calculator.ihvp_calculator, show_progress=False)
    np.testing.assert_allclose(result, _pairwise(first_order, (x[:5], y[:5]), dataset), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("problem", [_mlp_problem, _conv_problem])
def test_query_batching_at_full_rank_equals_exact(problem):
    model, dataset, (x, y) = problem()
    ihvp = il.EKFACIHVP(model, dataset, damping=DAMPING, show_progress=False)
    exact = il.KroneckerInfluenceCalculator(model, dataset, ihvp, show_progress=False)
    full_rank = il.KroneckerInfluenceCalculator(model, dataset, ihvp, query_rank=100, show_progress=False)
    expected = _pairwise(exact, (x[:4], y[:4]), dataset)
    np.testing.assert_allclose(
        _pairwise(full_rank, (x[:4], y[:4]), dataset), expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max()
    )


def test_rank_one_queries_equal_numpy_truncated_svd():
    model, dataset, (x, y) = _mlp_problem(seed=2)
    ihvp = il.EKFACIHVP(model, dataset, damping=DAMPING, show_progress=False)
    calculator = il.KroneckerInfluenceCalculator(model, dataset, ihvp, query_rank=1, show_progress=False)
    query = model.batch_jacobian_tensor((x[:3], y[:3])).numpy().astype(np.float64) @ _block_inverse(ihvp)
    gradients = model.batch_jacobian_tensor((x, y)).numpy().astype(np.float64)
    expected, start = 0.0, 0
    for block in ihvp.blocks:
        rows = block.input_dim
        kernel = query[:, start : start + (rows - 1) * block.output_dim].reshape(3, rows - 1, block.output_dim)
        bias = query[:, start + (rows - 1) * block.output_dim : start + block.size][:, None]
        matrices = np.concatenate([kernel, bias], axis=1)
        u, s, vt = np.linalg.svd(matrices, full_matrices=False)
        truncated = s[:, :1, None] * u[:, :, :1] @ vt[:, :1]
        flat = np.concatenate([truncated[:, :-1].reshape(3, -1), truncated[:, -1]], axis=1)
        expected = expected + flat @ gradients[:, start : start + block.size].T
        start += block.size
    result = _pairwise(calculator, (x[:3], y[:3]), dataset)
    np.testing.assert_allclose(result, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_rank_one_query_batching_on_embedding_matches_truncated_exact():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 7, size=(10, 3)).astype(np.int32)
    y = rng.normal(size=(10, 1)).astype(np.float32)
    model = keras.Sequential([
        keras.Input((3,), dtype="int32"), keras.layers.Embedding(7, 2), keras.layers.Flatten(), keras.layers.Dense(1)
    ])
    influence_model = il.InfluenceModel(model, start_layer=0, loss_function=keras.losses.MeanSquaredError(reduction=None))
    dataset = tf.data.Dataset.from_tensor_slices((ids, y)).batch(5)
    ihvp = il.EKFACIHVP(influence_model, dataset, damping=DAMPING, show_progress=False)
    low_rank = il.KroneckerInfluenceCalculator(influence_model, dataset, ihvp, query_rank=2, show_progress=False)
    exact = il.KroneckerInfluenceCalculator(influence_model, dataset, ihvp, show_progress=False)
    expected = _pairwise(exact, (ids[:3], y[:3]), dataset)
    np.testing.assert_allclose(_pairwise(low_rank, (ids[:3], y[:3]), dataset), expected, rtol=1e-3, atol=1e-5)


def test_per_layer_scores_sum_to_total_and_equal_per_block_products():
    model, dataset, (x, y) = _mlp_problem(seed=4)
    calculator = il.FirstOrderInfluenceCalculator(
        model, dataset, il.ExactIHVP(model, dataset, damping=DAMPING, show_progress=False), show_progress=False
    )
    per_layer = calculator.influence_values_per_layer((x[:4], y[:4]), (x, y)).numpy()
    assert per_layer.shape == (2, 4, len(x))
    np.testing.assert_allclose(per_layer.sum(axis=0), _pairwise(calculator, (x[:4], y[:4]), dataset), rtol=1e-4, atol=1e-5)
    gradients = model.batch_jacobian_tensor((x, y)).numpy().astype(np.float64)
    vectors = gradients @ np.linalg.inv(calculator.ihvp_calculator.hessian.numpy() + DAMPING * np.eye(len(gradients[0])))
    split = 4 * 5 + 5
    np.testing.assert_allclose(per_layer[0], gradients[:4, :split] @ vectors[:, :split].T, rtol=2e-3, atol=1e-4)
    self_per_layer = calculator.self_influence_values_per_layer((x, y)).numpy()
    total = il.extract_only_values(calculator.compute_influence_values(dataset)).numpy()
    np.testing.assert_allclose(self_per_layer.sum(axis=0), total, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("query_rank", [None, 2])
def test_kronecker_per_layer_scores_sum_to_total(query_rank):
    model, dataset, (x, y) = _conv_problem(seed=5)
    calculator = il.KroneckerInfluenceCalculator(
        model, dataset, il.KFACIHVPFactory(show_progress=False), query_rank=query_rank, show_progress=False
    )
    per_layer = calculator.influence_values_per_layer((x[:3], y[:3]), (x, y)).numpy()
    np.testing.assert_allclose(per_layer.sum(axis=0), _pairwise(calculator, (x[:3], y[:3]), dataset), rtol=1e-4, atol=1e-6)
    if query_rank is None:
        self_per_layer = calculator.self_influence_values_per_layer((x, y)).numpy()
        total = il.extract_only_values(calculator.compute_influence_values(dataset)).numpy()
        np.testing.assert_allclose(self_per_layer.sum(axis=0), total, rtol=1e-3, atol=1e-5)


def test_measurement_reaches_the_preconditioned_queries():
    model, dataset, (x, y) = _mlp_problem(seed=6)
    ihvp = il.KFACIHVP(model, dataset, damping=DAMPING, show_progress=False)
    kron = il.KroneckerInfluenceCalculator(model, dataset, ihvp, measurement="margin", show_progress=False)
    first_order = il.FirstOrderInfluenceCalculator(model, dataset, ihvp, measurement="margin", show_progress=False)
    np.testing.assert_allclose(
        _pairwise(kron, (x[:3], y[:3]), dataset), _pairwise(first_order, (x[:3], y[:3]), dataset), rtol=1e-3, atol=1e-4
    )


def test_bad_arguments_raise_clear_errors():
    model, dataset, (x, y) = _mlp_problem()
    with pytest.raises(ValueError, match="query_rank must be None .* or a positive integer"):
        il.KroneckerInfluenceCalculator(model, dataset, query_rank=0)
    with pytest.raises(TypeError, match="needs K-FAC curvature.*ExactIHVP"):
        il.KroneckerInfluenceCalculator(model, dataset, "exact", show_progress=False)
    arnoldi = il.ArnoldiInfluenceCalculator(model, dataset, subspace_dim=5, show_progress=False)
    with pytest.raises(ValueError, match="does not split its scores by watched layer"):
        arnoldi.influence_values_per_layer((x[:2], y[:2]), (x, y))


def test_group_influence_with_ekfac_equals_numpy():
    model, dataset, (x, y) = _mlp_problem(seed=7)
    calculator = il.FirstOrderInfluenceCalculator(
        model, dataset, il.KFACIHVPFactory(damping=DAMPING, corrected_eigenvalues=True, show_progress=False),
        show_progress=False,
    )
    group = tf.data.Dataset.from_tensor_slices((x[:6], y[:6])).batch(4)
    evaluated = tf.data.Dataset.from_tensor_slices((x[10:13], y[10:13])).batch(3)
    gradients = model.batch_jacobian_tensor((x, y)).numpy().astype(np.float64)
    expected = gradients[10:13].sum(0) @ _block_inverse(calculator.ihvp_calculator) @ gradients[:6].sum(0)
    value = calculator.estimate_influence_values_group(group, evaluated).numpy()
    np.testing.assert_allclose(value, [[expected]], rtol=2e-3)


def _embedding_problem():
    rng = np.random.default_rng(8)
    ids = rng.integers(0, 7, size=(10, 3)).astype(np.int32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 10)]
    model = keras.Sequential([
        keras.Input((3,), dtype="int32"), keras.layers.Embedding(7, 2), keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax"),
    ])
    return il.InfluenceModel(model, start_layer=0, last_layer=2), tf.data.Dataset.from_tensor_slices((ids, y)).batch(4), (ids, y)


@pytest.mark.parametrize("problem", [_mlp_problem, _conv_problem, _embedding_problem])
def test_self_influence_from_rotated_features_equals_numpy(problem):
    model, dataset, (x, y) = problem()
    calculator = il.KroneckerInfluenceCalculator(model, dataset, il.KFACIHVPFactory(
        damping=DAMPING, corrected_eigenvalues=True, show_progress=False), show_progress=False)
    ihvp = calculator.ihvp_calculator
    gradients = model.batch_jacobian_tensor((x, y)).numpy().astype(np.float64)
    expected = np.sum(gradients * ihvp.ihvp(gradients.astype(np.float32)).numpy(), axis=1)
    if problem is _mlp_problem:
        expected = np.sum(gradients * (gradients @ _block_inverse(ihvp)), axis=1)
    values = il.extract_only_values(calculator.compute_influence_values(dataset)).numpy()
    np.testing.assert_allclose(values, expected, rtol=2e-3, atol=1e-5 * np.abs(expected).max())
