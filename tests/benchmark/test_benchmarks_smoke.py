"""Smoke test of the influence_lib side of the side-by-side benchmark (no Influenciae needed).

The exact self-influence values it produces are checked against a float64 NumPy computation of
the last-layer softmax cross-entropy closed forms, so the benchmark is known to time the right
quantity (same Hessian samples, same convention as Influenciae); the orchestrator's ratios are
checked on hand-made timings (CG compares per-sample costs).
"""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARK_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    if str(BENCHMARK_DIR) not in sys.path:
        sys.path.insert(0, str(BENCHMARK_DIR))
    spec = importlib.util.spec_from_file_location(name, BENCHMARK_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


side = _load("influence_lib_side")
workloads = side.workloads

TINY = workloads.Settings(
    n_samples=48,
    hessian_samples=40,
    input_dim=4,
    hidden_units=6,
    n_classes=3,
    train_epochs=2,
    train_batch_size=16,
    checkpoint_epochs=(1, 2),
    influence_lib_batch_size=16,
    cg_max_iterations=200,
    cg_tolerance=1e-6,
    cg_influence_lib_rhs_batch_size=24,
    arnoldi_subspace_dim=8,
    arnoldi_k=4,
    repeats=1,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("side_by_side")
    TINY.save(directory / "settings.json")
    side.prepare(TINY, directory)
    return directory


def numpy_exact_self_influence(arrays: dict, settings) -> np.ndarray:
    """``g_iᵀ H⁺ g_i`` for the last Dense layer of the MLP, in float64.

    With ``a = [h, 1]`` the hidden activations plus the bias input and ``p`` the softmax output,
    the per-sample gradient is ``kron(a, p − y)`` and the per-sample Hessian is
    ``kron(a aᵀ, diag(p) − p pᵀ)`` (kernel entries first, row-major, then the bias).
    """
    kernel1, bias1, kernel2, bias2 = (w.astype(np.float64) for w in workloads.weights_of(arrays))
    inputs, labels = arrays["inputs"].astype(np.float64), arrays["labels"].astype(np.float64)
    hidden = np.maximum(inputs @ kernel1 + bias1, 0.0)
    logits = hidden @ kernel2 + bias2
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    augmented = np.hstack([hidden, np.ones((len(hidden), 1))])
    gradients = np.stack([np.kron(a, p - y) for a, p, y in zip(augmented, probs, labels)])
    hessian = np.mean(
        [
            np.kron(np.outer(a, a), np.diag(p) - np.outer(p, p))
            for a, p in zip(augmented[: settings.hessian_samples], probs[: settings.hessian_samples])
        ],
        axis=0,
    )
    inverse = np.linalg.pinv(hessian, rcond=1e-6, hermitian=True)
    return np.einsum("ip,pq,iq->i", gradients, inverse, gradients)


def test_prepare_writes_data_weights_and_checkpoints(workdir):
    arrays = workloads.load_model_file(workdir)
    assert arrays["inputs"].shape == (TINY.n_samples, TINY.input_dim)
    assert arrays["labels"].shape == (TINY.n_samples, TINY.n_classes)
    assert [w.shape for w in workloads.weights_of(arrays)] == [(4, 6), (6,), (6, 3), (3,)]
    for prefix in workloads.checkpoint_prefixes(TINY):
        assert len(workloads.weights_of(arrays, prefix)) == 4
    assert not np.allclose(arrays["epoch1_2"], arrays["epoch2_2"]), "training must move the checkpoints apart"


def test_exact_and_cg_match_numpy_ground_truth(workdir):
    results = {result["workload"]: result for result in side.run(TINY, workdir, ["exact", "cg"])}
    expected = numpy_exact_self_influence(workloads.load_model_file(workdir), TINY)
    exact = np.load(workdir / "influence_lib_exact.npy")
    cg = np.load(workdir / "influence_lib_cg.npy")
    np.testing.assert_allclose(exact, expected, rtol=2e-3, atol=1e-4 * expected.max())
    np.testing.assert_allclose(cg, expected, rtol=2e-2, atol=1e-3 * expected.max())
    for name in ("exact", "cg"):
        assert results[name]["n_values"] == TINY.n_samples
        assert results[name]["finite"]
        assert results[name]["cold_seconds"] > 0


def test_tracin_and_arnoldi_run_or_report_skip(workdir):
    for result in side.run(TINY, workdir, ["tracin", "tracin_all", "arnoldi"]):
        if "skipped" in result:
            assert "not found" in result["skipped"]
            continue
        values = np.load(workdir / f"influence_lib_{result['workload']}.npy")
        assert values.shape == (TINY.n_samples,)
        assert np.isfinite(values).all()


def test_agreement_and_workload_parsing():
    reference = np.array([1.0, 2.0, 4.0])
    same = workloads.agreement(reference, reference * (1 + 1e-7))
    assert same["pearson"] == pytest.approx(1.0)
    assert same["max_diff_over_max"] == pytest.approx(1e-7, rel=1e-3)
    shifted = workloads.agreement(reference, np.array([1.0, 2.0, 5.0]))
    assert shifted["max_diff_over_max"] == pytest.approx(0.25)
    assert shifted["median_rel_diff"] == pytest.approx(0.0)
    assert workloads.parse_workloads("exact, cg") == ["exact", "cg"]
    with pytest.raises(ValueError, match="Unknown workloads"):
        workloads.parse_workloads("exact,lissa")


def test_orchestrator_ratios_are_per_sample_for_cg(tmp_path):
    orchestrator = _load("run")
    ours_values = np.arange(1.0, 9.0)
    np.save(tmp_path / "influence_lib_cg.npy", ours_values)
    np.save(tmp_path / "influenciae_cg.npy", ours_values[:2] * 1.01)
    ours = {"n_values": 8, "cold_seconds": 4.0, "warm_seconds": 2.0}
    theirs = {"n_values": 2, "cold_seconds": 10.0, "warm_seconds": 8.0}
    row = orchestrator.compare("cg", ours, theirs, tmp_path)
    assert row["speedup_cold"] == pytest.approx((10.0 / 2) / (4.0 / 8))
    assert row["speedup_warm"] == pytest.approx((8.0 / 2) / (2.0 / 8))
    assert row["max_diff_over_max"] == pytest.approx(0.01 / 1.01)

    np.save(tmp_path / "influence_lib_exact.npy", ours_values)
    np.save(tmp_path / "influenciae_exact.npy", ours_values)
    row = orchestrator.compare("exact", ours, {**theirs, "n_values": 8}, tmp_path)
    assert row["speedup_warm"] == pytest.approx(8.0 / 2.0)
    assert row["pearson"] == pytest.approx(1.0)
