"""Every calculator works on a fresh instance whose first batch holds a single sample (traced loops
and matrix products must not freeze the batch size).

First-order values are checked against the NumPy closed form; for the other calculators the
one-sample run must reproduce, on a second fresh instance, the run on batches of 4, which each
calculator's own test file checks against its ground truth.
"""
import keras
import numpy as np
import pytest
import reference_math as rm
import tensorflow as tf

import influence_lib as il

N, D, C = 5, 4, 3


def _model() -> keras.Model:
    rng = np.random.default_rng(0)
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(C, activation="softmax", use_bias=False)])
    model.layers[-1].kernel.assign(rng.normal(scale=0.8, size=(D, C)).astype(np.float32))
    return model


def _data(n=N, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, D)).astype(np.float32), np.eye(C, dtype=np.float32)[rng.integers(0, C, n)]


def _dataset(batch_size, seed=1, n=N):
    return tf.data.Dataset.from_tensor_slices(_data(n, seed)).batch(batch_size)


CCE = keras.losses.CategoricalCrossentropy(reduction=None)

CALCULATORS = {
    "first_order": lambda train: il.FirstOrderInfluenceCalculator(
        il.InfluenceModel(_model()), train, ihvp_calculator=il.ExactIHVPFactory(damping=0.1), show_progress=False
    ),
    "arnoldi": lambda train: il.ArnoldiInfluenceCalculator(
        il.InfluenceModel(_model()), train, subspace_dim=8, k_largest_eig_vals=4, show_progress=False
    ),
    "tracin": lambda train: il.TracIn([il.InfluenceModel(_model())], 0.1, show_progress=False),
    "rps_l2": lambda train: il.RepresenterPointL2(_model(), train, CCE, 0.1, show_progress=False),
    "rps_lje": lambda train: il.RepresenterPointLJE(
        il.InfluenceModel(_model()), train, il.ExactIHVPFactory(damping=0.1), show_progress=False
    ),
    "trak": lambda train: il.TRAK(il.InfluenceModel(_model()), train, projection=il.Projection(8), damping=0.1,
                                  show_progress=False),
    "grad_dot": lambda train: il.GradDot(il.InfluenceModel(_model()), projection=il.Projection(8, structured=False),
                                         show_progress=False),
    "grad_cos": lambda train: il.GradCos(il.InfluenceModel(_model()), show_progress=False),
    "tracin_projected": lambda train: il.TracIn([il.InfluenceModel(_model())], 0.1, show_progress=False,
                                                projection=il.Projection(8)),
    "weights_boundary": lambda train: il.WeightsBoundaryCalculator(_model(), show_progress=False),
    "sample_boundary": lambda train: il.SampleBoundaryCalculator(_model(), show_progress=False),
}


@pytest.mark.parametrize("name", sorted(CALCULATORS))
def test_self_influence_with_a_one_sample_first_batch(name):
    one = il.extract_only_values(CALCULATORS[name](_dataset(1)).compute_influence_values(_dataset(1))).numpy()
    four = il.extract_only_values(CALCULATORS[name](_dataset(4)).compute_influence_values(_dataset(4))).numpy()
    assert one.shape == (N,)
    np.testing.assert_allclose(one, four, rtol=2e-4, atol=1e-5 * np.abs(four).max())


@pytest.mark.parametrize("name", [name for name in sorted(CALCULATORS) if "boundary" not in name])
def test_pairwise_and_top_k_with_one_sample_batches(name):
    calculator = CALCULATORS[name](_dataset(1))
    rows = [np.concatenate([values.numpy() for _, values in inner], axis=1)
            for _, inner in calculator.estimate_influence_values_in_batches(_dataset(1, seed=2, n=2), _dataset(1))]
    reference = CALCULATORS[name](_dataset(4))
    expected = np.concatenate([np.concatenate([values.numpy() for _, values in inner], axis=1)
                               for _, inner in reference.estimate_influence_values_in_batches(
                                   _dataset(4, seed=2, n=2), _dataset(4))])
    np.testing.assert_allclose(np.concatenate(rows), expected, rtol=2e-4, atol=1e-5 * np.abs(expected).max())
    top = list(calculator.top_k(_dataset(1, seed=2, n=2), _dataset(1), k=2))
    np.testing.assert_array_equal(
        np.concatenate([element[3].numpy() for element in top]), np.argsort(-expected, axis=1, kind="stable")[:, :2]
    )


def test_first_order_one_sample_batches_match_numpy():
    train = _dataset(1)
    calculator = CALCULATORS["first_order"](train)
    x, y = _data()
    kernel = _model().layers[-1].kernel.numpy().astype(np.float64)
    logits_gradients = rm.softmax(x.astype(np.float64) @ kernel) - y
    gradients = np.einsum("nd,nc->ndc", x, logits_gradients).reshape(N, -1)
    x64 = x.astype(np.float64)
    probabilities = rm.softmax(x64 @ kernel)
    hessian = sum(np.kron(np.outer(a, a), np.diag(p) - np.outer(p, p)) for a, p in zip(x64, probabilities)) / N
    inverse = np.linalg.inv(hessian + 0.1 * np.eye(D * C))
    expected = np.einsum("np,pq,nq->n", gradients, inverse, gradients)
    values = il.extract_only_values(calculator.compute_influence_values(train)).numpy()
    np.testing.assert_allclose(values, expected, rtol=1e-4)


def test_second_order_group_influence_with_one_sample_batches():
    def value(batch_size):
        train = _dataset(batch_size)
        calculator = il.SecondOrderInfluenceCalculator(
            il.InfluenceModel(_model()), train, il.ExactIHVPFactory(damping=0.1), show_progress=False
        )
        group = _dataset(batch_size, n=3)
        return calculator.estimate_influence_values_group(group).numpy()

    np.testing.assert_allclose(value(1), value(3), rtol=2e-4)
