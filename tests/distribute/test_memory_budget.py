"""The in-memory influence-vector cache is not chosen when it would not fit: the vectors go to disk, with a warning."""
import warnings

import numpy as np
import pytest
import reference_math as rm

import influence_lib as il
from influence_lib.common.memory import BUDGET_VARIABLE, describe_bytes, memory_budget_bytes


@pytest.fixture(scope="module")
def problem():
    model, train, x, y = rm.softmax_regression(n=20, d=4, c=3, seed=2, batch_size=6)
    kernel, bias = (w.numpy() for w in model.weights)
    gradients = rm.softmax_gradients(x, y, kernel, bias)
    expected = gradients @ rm.pseudo_inverse(rm.softmax_hessian(x, kernel, bias)) @ gradients.T
    undamped = il.ExactIHVPFactory(damping=0.0, show_progress=False)  # the reference is the pseudo-inverse
    calculator = il.FirstOrderInfluenceCalculator(il.InfluenceModel(model), train, undamped, show_progress=False)
    return calculator, train, expected


def _pairwise(batches) -> np.ndarray:
    return np.concatenate([np.concatenate([v.numpy() for _, v in inner], axis=1) for _, inner in batches], axis=0)


def test_vectors_over_the_budget_are_cached_on_disk_with_a_warning(problem, monkeypatch):
    calculator, train, expected = problem
    # 4 batches of up to 6 samples × 15 floats × 4 bytes = 1440 bytes; 500 is exceeded after the first batch.
    monkeypatch.setenv(BUDGET_VARIABLE, "500")
    message = r"\(15 floats per sample\) need up to about 1\.4 KiB.*budget of 500\.0 B.*CACHE\.DISK"
    with pytest.warns(RuntimeWarning, match=message):
        batches = calculator.estimate_influence_values_in_batches(train, train, il.CACHE.MEMORY)
    values = _pairwise(batches)
    np.testing.assert_allclose(values, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    np.testing.assert_allclose(_pairwise(batches), values)


def test_vectors_loaded_from_disk_stay_on_disk_when_over_the_budget(problem, monkeypatch, tmp_path):
    calculator, train, expected = problem
    path = str(tmp_path / "vectors")
    calculator.compute_influence_vector(train, save_influence_vector_ds_path=path)
    monkeypatch.setenv(BUDGET_VARIABLE, "1000")  # 20 × 15 × 4 = 1200 bytes
    message = r"cached at .*vectors.* \(15 floats per sample\) need up to about 1\.2 KiB.*read from disk on every pass"
    with pytest.warns(RuntimeWarning, match=message):
        batches = calculator.estimate_influence_values_in_batches(
            train, train, il.CACHE.MEMORY, load_influence_vector_path=path
        )
    np.testing.assert_allclose(_pairwise(batches), expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_vectors_within_the_budget_stay_in_memory_silently(problem, monkeypatch):
    calculator, train, expected = problem
    monkeypatch.setenv(BUDGET_VARIABLE, str(10**9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batches = calculator.estimate_influence_values_in_batches(train, train, il.CACHE.MEMORY)
    np.testing.assert_allclose(_pairwise(batches), expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_the_budget_defaults_to_half_the_available_memory_and_refuses_a_bad_setting(monkeypatch):
    monkeypatch.delenv(BUDGET_VARIABLE, raising=False)
    with open("/proc/meminfo", encoding="ascii") as handle:
        available = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemAvailable:"))
    assert abs(memory_budget_bytes() - available / 2) < 0.1 * available
    monkeypatch.setenv(BUDGET_VARIABLE, "2GB")
    with pytest.raises(ValueError, match="INFLUENCE_LIB_MEMORY_BUDGET must be a number of bytes.*'2GB'"):
        memory_budget_bytes()
    assert describe_bytes(1536) == "1.5 KiB" and describe_bytes(3 * 2**30) == "3.0 GiB"
