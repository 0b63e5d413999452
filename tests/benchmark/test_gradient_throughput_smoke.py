"""Smoke test of ``benchmarks/gradient_throughput.py`` on a tiny batch (timings are not checked)."""
import importlib.util
from pathlib import Path

import numpy as np
import tensorflow as tf

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gradient_throughput.py"
spec = importlib.util.spec_from_file_location("gradient_throughput", SCRIPT)
throughput = importlib.util.module_from_spec(spec)
spec.loader.exec_module(throughput)


def test_write_result_fills_a_batch_by_params_matrix_with_a_value_from_the_batch():
    inputs = tf.constant(np.arange(12, dtype=np.float32).reshape(3, 4) + 5.0)
    result = throughput.write_result(7)((inputs, tf.zeros((3, 2)))).numpy()
    np.testing.assert_array_equal(result, np.full((3, 7), 5.0, np.float32))


def test_mlp_benchmark_reports_every_method_and_agrees_with_pfor():
    result = throughput.benchmark("MLP", throughput.mlp, batch_size=8, repeats=2, budget=0.05)
    methods = {"closed_form", "closed_form_blocks", "jacobian_pfor", "vectorized_map", "batch_gradient",
               "norm_sq_closed", "write_result"}
    assert set(result["samples_per_second"]) == methods
    assert result["nb_params"] == 64 * 128 + 128 + 128 * 10 + 10
    assert result["max_abs_difference_vs_pfor"] < 1e-5
    assert result["time_vs_batch_gradient"]["batch_gradient"] == 1.0
    assert all(rate > 0 for rate in result["samples_per_second"].values())
