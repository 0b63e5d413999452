"""tf.distribute data parallelism: same numbers on 2 replicas (MirroredStrategy over 2 logical CPU devices,
MultiWorkerMirroredStrategy over 2 local processes) as on one device, plus the sharding rules.

Device layouts must be configured before TensorFlow initializes, so the distributed runs happen in
subprocesses (``scenario.py``) bounded by timeouts; the single-device outputs they are compared to are
themselves checked against float64 NumPy closed forms here.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import reference_math as rm
import tensorflow as tf

import influence_lib as il
from influence_lib.common.distribute import shard_bounds

SCENARIO = Path(__file__).with_name("scenario.py")
ROOT = SCENARIO.parents[2]
TIMEOUT_S = 240
EVERY_CALCULATOR = {
    "exact", "cg", "arnoldi", "lissa", "gauss_newton", "tracin", "representer_l2", "representer_lje",
    "boundary_sample", "boundary_weights", "group", "scoped_model", "kfac", "ekfac",
    "graddot", "gradcos", "trak", "trak_store", "ties", "between",
}
MULTI_WORKER = {"exact", "arnoldi", "tracin", "gauss_newton", "ekfac", "ties", "between"}


def _environment(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.update(TF_CPP_MIN_LOG_LEVEL="3", TF_NUM_INTEROP_THREADS="1", TF_NUM_INTRAOP_THREADS="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _check(process: subprocess.Popen, output: Path) -> dict:
    try:
        _, errors = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail(f"{output.name}: the distributed run did not finish in {TIMEOUT_S} s")
    assert process.returncode == 0, errors.decode()[-3000:]
    with np.load(output) as results:
        return dict(results)


def _start(output: Path, mode: str, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCENARIO), str(output), mode],
        env=_environment(SCENARIO_CACHE=str(output.parent / "cache"), **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _assert_same(expected: dict, actual: dict, prefix: str, calculators: set[str]) -> None:
    """Every output of ``calculators`` in ``expected`` equals ``actual[prefix/NAME]`` (indices exactly, values to
    float32 tolerance); ``actual`` holds outputs of no other calculator (nor ``expected``, unless
    ``prefix='padded'``, a subset)."""
    computed = {key.split("/")[1] for key in actual if key.startswith(f"{prefix}/") and key.count("/") > 1}
    assert computed == calculators
    if prefix != "padded":
        assert {key.split("/")[0] for key in expected if "/" in key} == calculators
    mismatched = []
    for key, value in expected.items():
        if key.endswith("shard_rows") or f"{prefix}/{key}" not in actual and prefix == "padded":
            continue
        other = actual[f"{prefix}/{key}"]
        if "indices" in key:
            if not np.array_equal(value, other):
                mismatched.append(f"{key}: {value.tolist()} vs {other.tolist()}")
        elif not np.allclose(other, value, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(value).max())):
            mismatched.append(f"{key}: max difference {np.abs(other - value).max():.3g}")
    assert not mismatched, mismatched


def _single_device_is_right(results: dict) -> None:
    """The one-device outputs of first-order influence match the float64 closed form of softmax regression."""
    model, _, x, y = rm.softmax_regression(n=29, d=4, c=3, seed=5, batch_size=7)
    kernel, bias = (w.numpy() for w in model.weights)
    rng = np.random.default_rng(9)
    x_test = rng.normal(size=(10, 4)).astype(np.float32)
    y_test = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 10)]
    hessian = rm.softmax_hessian(x, kernel, bias)
    inverse = rm.pseudo_inverse(hessian)
    g_train, g_test = rm.softmax_gradients(x, y, kernel, bias), rm.softmax_gradients(x_test, y_test, kernel, bias)
    pairwise = g_test @ inverse @ g_train.T
    np.testing.assert_allclose(results["single/exact/hessian"], hessian, atol=1e-5)
    np.testing.assert_allclose(results["single/gauss_newton/hessian"], hessian, atol=1e-5)
    tolerance = 2e-3 * np.abs(pairwise).max()
    for source in ("pairwise", "no_cache_pairwise", "over_budget_pairwise"):  # memory, recomputed, disk
        np.testing.assert_allclose(results[f"single/exact/{source}"], pairwise, rtol=2e-3, atol=tolerance)
    self_influence = np.einsum("np,pq,nq->n", g_train, inverse, g_train)
    np.testing.assert_allclose(results["single/exact/self"], self_influence, rtol=2e-3)
    order = np.argsort(-pairwise, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(results["single/exact/top_k_indices"], order)
    # The pairs of batches of GradDot, and its top-k over the set with ties: the smallest indices among equal
    # scores first (duplicates of one sample sit in different batches and replicas).
    test_batch = g_test[:4] @ g_train.T
    np.testing.assert_allclose(results["single/between/graddot_0"], test_batch[:, :7], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(results["single/between/graddot_4"], test_batch[:, 28:], rtol=1e-4, atol=1e-6)
    repeated = np.arange(29) % 6
    scores = (g_test @ g_train[repeated].T).astype(np.float32)
    for name, sign in (("top", -1.0), ("bottom", 1.0)):
        order = np.stack([np.lexsort((np.arange(29), sign * row))[:3] for row in scores])
        np.testing.assert_array_equal(results[f"single/ties/{name}_k_indices"], order)
        np.testing.assert_allclose(results[f"single/ties/{name}_k_values"], np.take_along_axis(scores, order, 1),
                                   rtol=1e-4, atol=1e-6)
    self_influence = np.sum(g_train[repeated] ** 2, axis=1).astype(np.float32)
    for name, sign in (("self_top", -1.0), ("self_bottom", 1.0)):
        order = np.lexsort((np.arange(29), sign * self_influence))[:4]
        np.testing.assert_array_equal(results[f"single/ties/{name}_k_indices"], order)
        np.testing.assert_allclose(results[f"single/ties/{name}_k_values"], self_influence[order], rtol=1e-4)
    assert results["single/exact/over_budget_warnings"] == 2  # pairwise values and top-k each fell back to disk
    if "single/graddot/pairwise" in results:
        dots = g_test @ g_train.T
        np.testing.assert_allclose(results["single/graddot/pairwise"], dots, rtol=1e-4, atol=1e-5 * np.abs(dots).max())
        np.testing.assert_allclose(results["single/graddot/self"], np.sum(g_train**2, axis=1), rtol=1e-4)


def _kronecker_factors_are_right(results: dict) -> None:
    """The one-device K-FAC factors of the two-layer network match float64 NumPy: ``A = mean ā āᵀ`` (inputs with a
    1 appended for the bias), ``S = mean δ δᵀ`` (δ: loss gradient with respect to the layer's outputs)."""
    _, _, x, y = rm.softmax_regression(n=29, d=4, c=3, seed=5, batch_size=7)
    names = [name for name in ("kfac", "ekfac") if f"single/{name}/a_0" in results]
    w1, b1, w2 = (results[f"single/{names[0]}/weight_{index}"].astype(np.float64) for index in range(3))
    x, y = x.astype(np.float64), y.astype(np.float64)
    hidden = np.tanh(x @ w1 + b1)
    probabilities = rm.softmax(hidden @ w2)
    delta_out = probabilities - y  # cross-entropy on softmax outputs: gradient w.r.t. the logits
    delta_hidden = (delta_out @ w2.T) * (1.0 - hidden**2)
    inputs = np.hstack([x, np.ones((len(x), 1))])
    expected = {
        "a_0": inputs.T @ inputs, "s_0": delta_hidden.T @ delta_hidden,
        "a_1": hidden.T @ hidden, "s_1": delta_out.T @ delta_out,
    }
    for name, value in expected.items():
        for method in names:
            np.testing.assert_allclose(results[f"single/{method}/{name}"], value / len(x), rtol=1e-4, atol=1e-6)


def test_mirrored_strategy_over_two_devices_gives_the_one_device_numbers(tmp_path):
    output = tmp_path / "mirrored.npz"
    results = _check(_start(output, "mirrored"), output)
    _single_device_is_right(results)
    _kronecker_factors_are_right(results)
    # The factor passes (A and S; EK-FAC's eigenvalues too) and TRAK's Gram pass summed the replicas' shards.
    for name, passes in (("kfac", 1), ("ekfac", 2), ("trak", 1)):
        np.testing.assert_array_equal(results[f"mirrored/{name}/fit_shard_rows"], ([3, 4] * 4 + [1, 1]) * passes)
        np.testing.assert_array_equal(results[f"single/{name}/fit_shard_rows"], [7, 7, 7, 7, 1] * passes)
    # Batches of 7, 7, 7, 7, 1 rows: shards of 3 and 4 rows, then none and 1 (the first replica computes a copy of
    # the last row for the output's shape and drops it).
    np.testing.assert_array_equal(results["mirrored/shard_rows"], [[3, 4]] * 4 + [[1, 1]])
    np.testing.assert_array_equal(results["single/shard_rows"], [[7]] * 4 + [[1]])
    # The in-memory influence vectors stay on the replica that computed them; each replica's top-k candidates
    # are merged, not its score rows: k = 3 per query for two top-k calls over 3 batches to evaluate, then k = 4
    # for two self-influence top-k calls.
    np.testing.assert_array_equal(results["mirrored/exact/cache_shard_rows"], [[3, 4]] * 4 + [[0, 1]])
    np.testing.assert_array_equal(results["single/exact/cache_shard_rows"], [[7]] * 4 + [[1]])
    np.testing.assert_array_equal(results["mirrored/ties/candidates_shard_rows"], [6] * 6 + [8] * 2)
    assert results["single/ties/candidates_shard_rows"].size == 0
    expected = {k[len("single/"):]: v for k, v in results.items() if k.startswith("single/")}
    _assert_same(expected, results, "mirrored", EVERY_CALCULATOR)
    # Shards padded to equal size (the TPUStrategy path): 4 rows per replica (3 + 1 copy, 4), the last batch's
    # row plus a copy for the other replica; the same numbers.
    np.testing.assert_array_equal(results["padded/shard_rows"], [[4, 4]] * 4 + [[1, 1]])
    _assert_same(expected, results, "padded", {"exact", "tracin", "trak", "between"})


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def test_multi_worker_strategy_over_two_processes_gives_the_one_process_numbers(tmp_path):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    outputs = [tmp_path / f"worker_{index}.npz" for index in range(2)]
    configs = [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(2)]
    processes = [_start(output, "multiworker", TF_CONFIG=config) for output, config in zip(outputs, configs)]
    try:
        workers = [_check(process, output) for process, output in zip(processes, outputs)]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    # Both workers saved their influence vectors under the same path, each in its own directory.
    assert sorted(os.listdir(tmp_path / "cache" / "distributed")) == ["worker_0", "worker_1"]
    _single_device_is_right(workers[0])
    _kronecker_factors_are_right(workers[0])
    expected = {k[len("single/"):]: v for k, v in workers[0].items() if k.startswith("single/")}
    for index, worker in enumerate(workers):
        # Each worker computes the rows of its own replica: 3 (worker 0) or 4 (worker 1) of every batch of 7; the
        # last batch's single row belongs to worker 1, worker 0 computes a copy of it and drops it.
        np.testing.assert_array_equal(worker["multiworker/shard_rows"], [[3 + index]] * 4 + [[1]])
        _assert_same(expected, worker, "multiworker", MULTI_WORKER)
        # Each worker keeps only its replica's rows of the influence vectors (3 or 4 of each batch of 7, the last
        # batch's row on worker 1), merges the candidates of both for top-k, and pads to 4 rows when forced.
        np.testing.assert_array_equal(worker["multiworker/exact/cache_shard_rows"], [[3 + index]] * 4 + [[index]])
        np.testing.assert_array_equal(worker["multiworker/ties/candidates_shard_rows"], [6] * 6 + [8] * 2)
        np.testing.assert_array_equal(worker["padded/shard_rows"], [[4]] * 4 + [[1]])
        _assert_same(expected, worker, "padded", {"exact", "tracin", "between"})
        # EK-FAC's two factor passes summed this worker's rows of every batch across the workers.
        np.testing.assert_array_equal(worker["multiworker/ekfac/fit_shard_rows"], ([3 + index] * 4 + [1]) * 2)
        # Different weights, or the same samples in another order, are refused on every worker.
        weights, data, not_finite = worker["refusals"]
        assert "The watched weights differ between the workers of the cluster: every worker must load" in weights
        assert "The first training batches differ between the workers of the cluster: every worker must" in data
        # A NaN influence vector computed on worker 1 only is refused by both, naming its index.
        assert "In the training batch starting at sample 7: Influence vectors are NaN or infinite for the " \
            "samples at indices [12]" in not_finite


@pytest.mark.parametrize("size, replicas", [(7, 2), (1, 2), (10, 3), (0, 4), (5, 8)])
def test_shards_are_contiguous_balanced_and_cover_the_batch(size, replicas):
    bounds = [shard_bounds(size, replicas, replica) for replica in range(replicas)]
    assert bounds[0][0] == 0 and bounds[-1][1] == size
    assert all(end == next_start for (_, end), (next_start, _) in zip(bounds, bounds[1:]))
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_the_default_strategy_calls_the_function_on_the_whole_batch():
    parallel = il.DataParallel()
    assert parallel.replicas == 1 and not parallel.distributed
    batch = (tf.constant([[1.0], [2.0], [3.0]]),)
    marker = object()
    assert parallel.map_rows(lambda b: marker if b is batch else None, batch) is marker
    assert parallel.sum_rows(lambda b, scale: tf.reduce_sum(b[0]) * scale, batch, 2.0).numpy() == 12.0
    assert not parallel.multi_worker and parallel.worker_path("cache/vectors") == "cache/vectors"


def test_a_strategy_that_is_not_one_is_refused_with_its_type():
    model, train, _, _ = rm.softmax_regression(n=8, batch_size=4)
    with pytest.raises(TypeError, match="strategy must be a tf.distribute.Strategy.*got str"):
        il.FirstOrderInfluenceCalculator(il.InfluenceModel(model), train, show_progress=False, strategy="mirrored")
    with pytest.raises(TypeError, match="got int"):
        with il.using_strategy(2):
            pass
    influence_model = il.InfluenceModel(model)
    refusals = {
        "EKFACIHVP": lambda: il.EKFACIHVP(influence_model, train, show_progress=False, strategy="mirrored"),
        "KroneckerInfluenceCalculator": lambda: il.KroneckerInfluenceCalculator(
            influence_model, train, show_progress=False, strategy="mirrored"),
        "TRAK": lambda: il.TRAK(influence_model, train, None, show_progress=False, strategy="mirrored"),
        "GradCos": lambda: il.GradCos(influence_model, show_progress=False, strategy="mirrored"),
    }
    for name, build in refusals.items():
        with pytest.raises(TypeError, match="strategy must be a tf.distribute.Strategy.*got str"):
            build()
