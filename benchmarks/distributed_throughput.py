"""Throughput of data-parallel influence on 1 and 2 workers (``MultiWorkerMirroredStrategy``), scaling efficiency.

Each worker is a separate process on this machine restricted to one CPU thread, standing for one
device; the 2-worker run is a ``MultiWorkerMirroredStrategy`` cluster on 127.0.0.1 (``TF_CONFIG``),
the 1-worker run the plain single-device path (no strategy). Two workloads on a small CNN
(28×28×1 → Conv2D 16 → MaxPool → Conv2D 32 → MaxPool → Dense 10, every layer watched):

* ``self_influence``: TracIn self-influence of every training sample (per-sample gradient norms:
  per-sample outputs, all-gathered);
* ``hvp``: one pass of Hessian-vector products of the mean training loss with 4 vectors
  (``HessianOperator.matmat``: sums, all-reduced) — the pass every CG / LiSSA / Arnoldi step makes;
* ``top_k``: GradDot ``top_k`` of 64 queries over the training set, k = 10 (the in-memory cache of
  per-sample gradients, each worker holding only its rows; scores computed where the rows are; the
  workers' candidates merged) — also reports the bytes of influence vectors each worker holds.

Both also run in ONE single-threaded process with a ``MirroredStrategy`` over 2 logical CPU
devices: the local-replica path (shards computed one after the other, combined locally), which
shows its overhead rather than a speed-up on one thread.

Each workload runs once untimed (tracing), then ``--repeats`` timed passes; the fastest pass is kept.
The time of a multi-worker pass is that of its slowest worker. Scaling efficiency is
``throughput(2 workers) / (2 × throughput(1 worker))``. The outputs of both runs are compared.

Command: ``.venv/bin/python benchmarks/distributed_throughput.py --samples 2048 --batch-size 256``
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _worker(samples: int, batch_size: int, repeats: int) -> dict:
    import tensorflow as tf

    if "TF_CONFIG" in os.environ:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif os.environ.get("BENCHMARK_MIRRORED"):
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    else:
        strategy = None
    import keras

    import influence_lib as il
    from influence_lib.common.distribute import data_parallel

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, 28, 28, 1)).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, samples)]
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).cache()
    influence_model = il.InfluenceModel(model, start_layer=0, last_layer=-1)
    tracin = il.TracIn([influence_model], 0.1, show_progress=False, strategy=strategy)
    with il.using_strategy(strategy):
        hessian = il.HessianOperator(influence_model, train)
    vectors = tf.constant(rng.normal(size=(4, influence_model.nb_params)), tf.float32)
    queries = tf.data.Dataset.from_tensor_slices((x[:64], y[:64])).batch(64)
    graddot = il.GradDot(influence_model, show_progress=False, strategy=strategy)

    def top_k() -> tuple[np.ndarray, np.ndarray]:
        (_, values, _, indices), = list(graddot.top_k(queries, train, 10))
        return values.numpy(), indices.numpy()

    def timed(run) -> tuple[float, np.ndarray]:
        result = run()
        best = np.inf
        for _ in range(repeats):
            start = time.perf_counter()
            result = run()
            best = min(best, time.perf_counter() - start)
        return best, result

    self_time, self_values = timed(lambda: il.extract_only_values(tracin.compute_influence_values(train)).numpy())
    hvp_time, hvp_values = timed(lambda: hessian.matmat(vectors).numpy())
    top_k_time, (top_k_values, top_k_indices) = timed(top_k)
    cached, _, _ = graddot._vectors_in_memory(train)
    cached_bytes = sum(
        part.shape.num_elements() * part.dtype.size for batch in cached for part in getattr(batch, "parts", [batch])
    )

    batch = next(iter(train))
    identity = lambda b: b  # noqa: E731
    parallel = data_parallel(None)
    start = time.perf_counter()
    for _ in range(10000):
        parallel.map_rows(identity, batch)
    dispatch_us = (time.perf_counter() - start) / 10000 * 1e6
    return {
        "params": influence_model.nb_params,
        "self_influence_s": self_time,
        "hvp_s": hvp_time,
        "self_influence": self_values.tolist(),
        "hvp_norm": float(np.linalg.norm(hvp_values)),
        "hvp_first": hvp_values[0, :8].tolist(),
        "top_k_s": top_k_time,
        "top_k": top_k_values.tolist(),
        "top_k_indices": top_k_indices.tolist(),
        "cached_bytes": cached_bytes,
        "default_lookup_us": dispatch_us if strategy is None else None,
    }


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _run(workers: int, args, mirrored: bool = False) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if mirrored:
        env["BENCHMARK_MIRRORED"] = "1"
    env.update(TF_CPP_MIN_LOG_LEVEL="3", TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", OMP_NUM_THREADS="1")
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(workers)]}
    command = [sys.executable, __file__, "--worker", "--samples", str(args.samples),
               "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
    processes = []
    for index in range(workers):
        worker_env = dict(env)
        if workers > 1:
            worker_env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(command, env=worker_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=args.timeout)
            if process.returncode != 0:
                raise RuntimeError(f"a worker failed:\n{err.decode()[-3000:]}")
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=600, help="seconds before a worker is killed")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.samples, args.batch_size, args.repeats)))
        return

    one, two = _run(1, args)[0], _run(2, args)
    mirrored = _run(1, args, mirrored=True)[0]
    report = {"samples": args.samples, "batch_size": args.batch_size, "params": one["params"],
              "default_strategy_lookup_us": one["default_lookup_us"]}
    print(f"{args.samples} samples, batches of {args.batch_size}, CNN with {one['params']} watched parameters")
    print(f"default strategy: {one['default_lookup_us']:.2f} µs per batch for the DataParallel dispatch")
    print("| workload | 1 worker, samples/s | 2 workers, samples/s | speed-up | scaling efficiency "
          "| max rel. difference |")
    print("|---|---|---|---|---|---|")
    for name, key in (("self_influence", "self_influence_s"), ("hvp", "hvp_s"), ("top_k", "top_k_s")):
        single = args.samples / one[key]
        double = args.samples / max(worker[key] for worker in two)
        output = {"self_influence": "self_influence", "hvp": "hvp_first", "top_k": "top_k"}[name]
        reference = np.asarray(one[output])
        difference = max(np.abs(np.asarray(w[output]) - reference).max() for w in two) / np.abs(reference).max()
        report[name] = {"one_worker": single, "two_workers": double, "efficiency": double / (2 * single),
                        "max_relative_difference": float(difference)}
        print(f"| {name} | {single:,.0f} | {double:,.0f} | {double / single:.2f}× | {double / (2 * single):.0%} "
              f"| {difference:.1e} |")
        local = args.samples / mirrored[key]
        report[name]["mirrored_one_process"] = local
        print(f"| {name}, MirroredStrategy over 2 logical CPU devices in 1 process (1 thread) | {single:,.0f} "
              f"| {local:,.0f} | {local / single:.2f}× | {local / (2 * single):.0%} | — |")
    same = all(worker["top_k_indices"] == one["top_k_indices"] for worker in two)
    print(f"top_k: training indices {'identical' if same else 'DIFFERENT'} on 1 and 2 workers")
    report["top_k"]["same_indices"] = same
    held = ", ".join(f"{worker['cached_bytes'] / 2**20:.1f} MiB" for worker in two)
    print(f"influence vectors held per worker: 1 worker {one['cached_bytes'] / 2**20:.1f} MiB; 2 workers {held}")
    report["cached_bytes"] = {"one_worker": one["cached_bytes"], "two_workers": [w["cached_bytes"] for w in two]}
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
