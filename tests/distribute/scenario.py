"""The computations compared across device layouts by ``test_distribute.py``, run in subprocesses.

``python scenario.py OUT.npz MODE`` configures TensorFlow for ``MODE`` before it initializes, runs
every calculator on the same tiny problems and saves their outputs:

* ``mirrored``: two logical CPU devices; each output is computed on one device (default strategy)
  under the key ``single/NAME`` and with a ``MirroredStrategy`` over both under ``mirrored/NAME``.
* ``single``: one device, keys ``single/NAME``.
* ``multiworker``: one worker of a ``MultiWorkerMirroredStrategy`` (``TF_CONFIG`` set by the test);
  the outputs of first-order, Arnoldi, TracIn and EK-FAC go under ``multiworker/NAME``, and worker 0 adds
  the same outputs computed in one process as ``single/NAME``.

In ``mirrored`` and ``multiworker`` modes, a subset is also computed with the shards padded to equal
size (:func:`influence_lib.padded_shards`, the ``TPUStrategy`` path) under ``padded/NAME``.

Influence vectors saved to disk go under the directory ``SCENARIO_CACHE`` (environment).
The training set has 29 samples in batches of 7 (shards of 3 and 4 rows, then a last batch of one
row that leaves a replica without rows). A second training set (``ties``) repeats 6 samples, so that
top-k meets exact ties across batches and replicas.
"""
import contextlib
import os
import sys
import warnings

import numpy as np
import tensorflow as tf

N_TRAIN, BATCH, K = 29, 7, 5


def _configure(mode: str) -> tf.distribute.Strategy | None:
    if mode == "single":
        return None
    if mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    return tf.distribute.MultiWorkerMirroredStrategy()


def _problems():
    import keras
    import reference_math as rm

    import influence_lib as il

    model, train, x, y = rm.softmax_regression(n=N_TRAIN, d=4, c=3, seed=5, batch_size=BATCH)
    rng = np.random.default_rng(9)
    x_test = rng.normal(size=(10, 4)).astype(np.float32)
    y_test = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 10)]
    test = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(4)
    checkpoints = [il.InfluenceModel(rm.softmax_regression(n=4, seed=seed)[0]) for seed in (6, 7)]

    deep = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dense(3, use_bias=False, activation="softmax"),
        ]
    )
    deep.set_weights([rng.normal(scale=0.7, size=w.shape).astype(np.float32) for w in deep.weights])
    return il.InfluenceModel(model), train, test, checkpoints, deep


def _pairwise(batches) -> np.ndarray:
    return np.concatenate([np.concatenate([v.numpy() for _, v in inner], axis=1) for _, inner in batches], axis=0)


def _top_k(dataset) -> tuple[np.ndarray, np.ndarray]:
    elements = list(dataset)
    return (np.concatenate([e[1].numpy() for e in elements]), np.concatenate([e[3].numpy() for e in elements]))


def _shard_rows(strategy: tf.distribute.Strategy | None, train: tf.data.Dataset) -> np.ndarray:
    """Rows computed by each local replica per training batch (shows the work was split)."""
    from influence_lib import DataParallel

    parallel = DataParallel(strategy)
    rows = []
    for batch in train:
        seen = []
        parallel.map_rows(lambda shard: seen.append(int(shard[0].shape[0])) or shard[0], batch)
        rows.append(seen)
    return np.array(rows)


@contextlib.contextmanager
def _summed_shard_rows():
    """Record the rows of every shard that ``DataParallel.sum_rows`` hands to its function inside the block."""
    from influence_lib import DataParallel
    from influence_lib.common.datasets import batch_size_of

    original, rows = DataParallel.sum_rows, []

    def recording(self, function, batch, *args):
        def recorded(shard, *rest):
            rows.append(batch_size_of(shard))
            return function(shard, *rest)

        return original(self, recorded, batch, *args)

    DataParallel.sum_rows = recording
    try:
        yield rows
    finally:
        DataParallel.sum_rows = original


def ties_problem():
    """29 training samples that repeat 6 distinct ones (sample ``i`` is sample ``i mod 6``), batches of 7, and
    the model and test set of :func:`_problems`: exact ties between samples of different batches and replicas."""
    model, train, _, _, _ = _problems()
    x, y = (np.concatenate([tensor.numpy() for tensor in parts]) for parts in zip(*train))
    repeated = np.arange(N_TRAIN) % 6
    return model, tf.data.Dataset.from_tensor_slices((x[repeated], y[repeated])).batch(BATCH), x[repeated], y[repeated]


@contextlib.contextmanager
def _merged_candidates():
    """Record the number of candidates per query that ``ShardedTopK`` merges inside the block."""
    from influence_lib.common import top_k

    original, counts = top_k.merge_candidates, []

    def recording(candidates, *args):
        counts.append(int(candidates.values.shape[1]))
        return original(candidates, *args)

    top_k.merge_candidates = recording
    try:
        yield counts
    finally:
        top_k.merge_candidates = original


def sharding_outputs(strategy: tf.distribute.Strategy | None, exact) -> dict[str, np.ndarray]:
    """What the split influence-vector cache and the per-replica top-k give: the rows each replica holds in the
    in-memory cache, values and top-k from a cache over the memory budget (per-worker temporary disk cache),
    top-k with ties (GradDot on :func:`ties_problem`, both orders, pairwise and self-influence), and
    ``influence_between_batches``."""
    import influence_lib as il

    from influence_lib.common.distribute import RowShards
    from influence_lib.common.memory import BUDGET_VARIABLE

    model, train, test, checkpoints, deep = _problems()
    out = {}
    vectors, _, _ = exact._vectors_in_memory(train)
    out["exact/cache_shard_rows"] = np.array([
        [int(part.shape[0]) for part in batch.parts] if isinstance(batch, RowShards) else [int(batch.shape[0])]
        for batch in vectors
    ])
    os.environ[BUDGET_VARIABLE] = "500"  # 29 × 15 floats × 4 bytes = 1740 bytes: over the budget on every worker
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out["exact/over_budget_pairwise"] = _pairwise(exact.estimate_influence_values_in_batches(test, train))
            values, indices = _top_k(exact.top_k(test, train, K))
            out["exact/over_budget_top_k_values"], out["exact/over_budget_top_k_indices"] = values, indices
    finally:
        del os.environ[BUDGET_VARIABLE]
    out["exact/over_budget_warnings"] = np.array(sum("budget" in str(w.message) for w in caught))
    no_cache = il.CACHE.NO_CACHE  # the vectors recomputed, still split, for every batch to evaluate
    out["exact/no_cache_pairwise"] = _pairwise(exact.estimate_influence_values_in_batches(test, train, no_cache))
    values, indices = _top_k(exact.top_k(test, train, K, il.ORDER.ASCENDING, influence_vector_in_cache=no_cache))
    out["exact/no_cache_bottom_k_values"], out["exact/no_cache_bottom_k_indices"] = values, indices
    tie_model, tie_train, _, _ = ties_problem()
    graddot = il.GradDot(tie_model, show_progress=False, strategy=strategy)
    with _merged_candidates() as counts:
        for order, name in ((il.ORDER.DESCENDING, "top"), (il.ORDER.ASCENDING, "bottom")):
            values, indices = _top_k(graddot.top_k(test, tie_train, 3, order))
            out[f"ties/{name}_k_values"], out[f"ties/{name}_k_indices"] = values, indices
        for order, name in ((il.ORDER.DESCENDING, "self_top"), (il.ORDER.ASCENDING, "self_bottom")):
            best = graddot.compute_top_k_from_training_dataset(tie_train, 4, order)
            out[f"ties/{name}_k_values"], out[f"ties/{name}_k_indices"] = best.values.numpy(), best.indices.numpy()
    out["ties/candidates_shard_rows"] = np.array(counts)
    queries = next(iter(test))
    train_batches = list(train)
    between = {
        "tracin": il.TracIn(checkpoints, [0.1, 0.05], show_progress=False, strategy=strategy),
        "graddot": il.GradDot(model, show_progress=False, strategy=strategy),
        "trak": il.TRAK(il.InfluenceModel(deep, start_layer=0, last_layer=1), train, il.Projection(8, seed=1),
                        show_progress=False, strategy=strategy),
    }
    for name, calculator in between.items():
        # A batch of 7 (shards of 3 and 4 rows) and the last batch of one row (a replica without rows).
        for index in (0, len(train_batches) - 1):
            out[f"between/{name}_{index}"] = calculator.influence_between_batches(queries, train_batches[index]).numpy()
    return out


def padded_outputs(
    strategy: tf.distribute.Strategy | None, names: tuple[str, ...] = ("exact", "tracin", "trak")
) -> dict[str, np.ndarray]:
    """First-order (exact), TracIn and TRAK (those in ``names``) with every replica's shard padded to equal size:
    self-influence, pairwise values, top-k and pairs of batches; and the rows each replica computed."""
    import influence_lib as il
    from influence_lib.curvature.factory import ExactIHVPFactory

    model, train, test, checkpoints, deep = _problems()
    out = {}
    with il.padded_shards():
        out["shard_rows"] = _shard_rows(strategy, train)
        builders = {
            "exact": lambda: il.FirstOrderInfluenceCalculator(
                model, train, ExactIHVPFactory(damping=0.0, show_progress=False), show_progress=False,
                strategy=strategy),
            "tracin": lambda: il.TracIn(checkpoints, [0.1, 0.05], show_progress=False, strategy=strategy),
            "trak": lambda: il.TRAK(il.InfluenceModel(deep, start_layer=0, last_layer=1), train,
                                    il.Projection(8, seed=1), show_progress=False, strategy=strategy),
        }
        calculators = {name: builders[name]() for name in names}
        train_batches = list(train)
        for name, calculator in calculators.items():
            out[f"{name}/self"] = il.extract_only_values(calculator.compute_influence_values(train)).numpy()
            out[f"{name}/pairwise"] = _pairwise(calculator.estimate_influence_values_in_batches(test, train))
            out[f"{name}/top_k_values"], out[f"{name}/top_k_indices"] = _top_k(calculator.top_k(test, train, K))
            if name != "exact":
                queries = next(iter(test))
                for index in (0, len(train_batches) - 1):
                    between = calculator.influence_between_batches(queries, train_batches[index])
                    out[f"between/{name}_{index}"] = between.numpy()
        out["exact/hessian"] = calculators["exact"].ihvp_calculator.hessian.numpy()
    return out


def compute(strategy: tf.distribute.Strategy | None, every_calculator: bool = True) -> dict[str, np.ndarray]:
    """The outputs compared by the tests, computed under ``strategy`` (None: one device).

    ``every_calculator=False`` keeps first-order influence (exact Hessian, Gauss-Newton), Arnoldi and
    TracIn: per-sample outputs, sums and the Arnoldi passes, with fewer TensorFlow traces.
    """
    import keras

    import influence_lib as il
    from influence_lib.curvature.factory import ExactIHVPFactory

    model, train, test, checkpoints, deep = _problems()
    out = {"shard_rows": _shard_rows(strategy, train)}
    vectors = tf.constant(np.random.default_rng(3).normal(size=(3, model.nb_params)), tf.float32)

    def self_outputs(name, calculator):
        out[f"{name}/self"] = il.extract_only_values(calculator.compute_influence_values(train)).numpy()
        best = calculator.compute_top_k_from_training_dataset(train, K)
        out[f"{name}/self_top_k_values"], out[f"{name}/self_top_k_indices"] = best.values.numpy(), best.indices.numpy()

    def calculator_outputs(name, calculator):
        self_outputs(name, calculator)
        out[f"{name}/pairwise"] = _pairwise(calculator.estimate_influence_values_in_batches(test, train))
        out[f"{name}/top_k_values"], out[f"{name}/top_k_indices"] = _top_k(calculator.top_k(test, train, K))

    # damping=0: the test compares with the pseudo-inverse (the default damping='auto' would damp it).
    undamped = ExactIHVPFactory(damping=0.0, show_progress=False)
    exact = il.FirstOrderInfluenceCalculator(model, train, undamped, show_progress=False, strategy=strategy)
    calculator_outputs("exact", exact)
    out["exact/hessian"] = exact.ihvp_calculator.hessian.numpy()
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        arnoldi = il.ArnoldiInfluenceCalculator(model, train, 10, k_largest_eig_vals=6, show_progress=False)
        calculator_outputs("arnoldi", arnoldi)
        out["arnoldi/eigenvalues"] = arnoldi.eig_vals.numpy()
    calculator_outputs("tracin", il.TracIn(checkpoints, [0.1, 0.05], show_progress=False, strategy=strategy))
    cache = os.path.join(os.environ["SCENARIO_CACHE"], "single" if strategy is None else "distributed")
    on_disk = exact.top_k(test, train, K, influence_vector_in_cache=il.CACHE.DISK, save_influence_vector_ds_path=cache)
    out["exact/disk_top_k_values"], out["exact/disk_top_k_indices"] = _top_k(on_disk)
    with il.using_strategy(strategy):
        gauss_newton = il.ExactIHVP(model, train, hessian="gauss_newton", show_progress=False)
    out["gauss_newton/hessian"] = gauss_newton.hessian.numpy()
    out.update(sharding_outputs(strategy, exact))
    if not every_calculator:
        out.update(kronecker_outputs(deep, train, test, strategy, ("ekfac",)))
        return out

    with il.using_strategy(strategy):
        solver = il.ConjugateGradientDescentIHVP(model, train, n_opt_iters=30, damping=1.0)
        out["lissa/ihvp"] = il.LissaIHVP(model, train, n_opt_iters=20, damping=0.1, scale=5.0).ihvp(vectors).numpy()
    cg = il.FirstOrderInfluenceCalculator(model, train, solver, show_progress=False, strategy=strategy)
    calculator_outputs("cg", cg)
    out["cg/hvp"] = cg.ihvp_calculator.hvp(vectors).numpy()
    loss = il.InfluenceModel(deep).loss_function
    l2 = il.RepresenterPointL2(deep, train, loss, 0.1, show_progress=False, strategy=strategy)
    calculator_outputs("representer_l2", l2)
    out["representer_l2/kernel"] = l2.kernel.numpy()
    lje_factory = ExactIHVPFactory(damping=0.05, show_progress=False)
    lje = il.RepresenterPointLJE(il.InfluenceModel(deep), train, lje_factory, show_progress=False, strategy=strategy)
    calculator_outputs("representer_lje", lje)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        scoped = keras.models.clone_model(model.model)  # weights mirrored on both devices under the strategy
    scoped.set_weights(model.model.get_weights())
    scoped_model = il.InfluenceModel(scoped)
    in_scope = il.FirstOrderInfluenceCalculator(scoped_model, train, show_progress=False, strategy=strategy)
    out["scoped_model/self"] = il.extract_only_values(in_scope.compute_influence_values(train)).numpy()
    boundaries = {"boundary_sample": il.SampleBoundaryCalculator, "boundary_weights": il.WeightsBoundaryCalculator}
    for name, boundary in boundaries.items():
        self_outputs(name, boundary(model.model, 20, show_progress=False, strategy=strategy))
    group = train.unbatch().take(10).batch(7)
    out["group/first_order"] = exact.estimate_influence_values_group(group, test).numpy()
    second = il.SecondOrderInfluenceCalculator(model, train, show_progress=False, strategy=strategy)
    out["group/second_order"] = second.estimate_influence_values_group(group, test).numpy()
    out.update(kronecker_outputs(deep, train, test, strategy))
    calculator_outputs("graddot", il.GradDot(model, show_progress=False, strategy=strategy))
    calculator_outputs("gradcos", il.GradCos(model, show_progress=False, strategy=strategy))
    deep_model = il.InfluenceModel(deep, start_layer=0, last_layer=1)
    with _summed_shard_rows() as rows:
        trak = il.TRAK(deep_model, train, il.Projection(8, seed=1), show_progress=False, strategy=strategy)
    out["trak/fit_shard_rows"] = np.array(rows)
    calculator_outputs("trak", trak)
    out["trak/kernel"] = trak.kernels[0].numpy()
    store = os.path.join(os.environ["SCENARIO_CACHE"], "trak_" + ("single" if strategy is None else "distributed"))
    stored = il.TRAK(deep_model, train, il.Projection(8, seed=1), feature_store=store, show_progress=False,
                     strategy=strategy)
    calculator_outputs("trak_store", stored)
    out["trak_store/kernel"] = stored.kernels[0].numpy()
    return out


def kronecker_outputs(
    deep, train: tf.data.Dataset, test: tf.data.Dataset, strategy, names: tuple[str, ...] = ("kfac", "ekfac")
) -> dict[str, np.ndarray]:
    """K-FAC and EK-FAC on both layers of ``deep``: factors ``A``, ``S``, eigenvalues (EK-FAC's corrected ones),
    self-influence, pairwise values and top-k; plus ``deep``'s weights for the float64 check of the factors."""
    import influence_lib as il

    deep_model = il.InfluenceModel(deep, start_layer=0, last_layer=1)
    out = {f"{names[0]}/weight_{index}": weight.numpy() for index, weight in enumerate(deep.weights)}
    for name in names:
        with _summed_shard_rows() as rows:
            calculator = il.KroneckerInfluenceCalculator(deep_model, train, name, show_progress=False, strategy=strategy)
        out[f"{name}/fit_shard_rows"] = np.array(rows)
        out[f"{name}/self"] = il.extract_only_values(calculator.compute_influence_values(train)).numpy()
        out[f"{name}/pairwise"] = _pairwise(calculator.estimate_influence_values_in_batches(test, train))
        out[f"{name}/top_k_values"], out[f"{name}/top_k_indices"] = _top_k(calculator.top_k(test, train, K))
        for index, factors in enumerate(calculator.ihvp_calculator.factors):
            out[f"{name}/a_{index}"], out[f"{name}/s_{index}"] = factors.a_covariance, factors.s_covariance
            out[f"{name}/eigenvalues_{index}"] = factors.eigenvalues
    return out


def _refusals(strategy: tf.distribute.Strategy) -> list[str]:
    """The errors raised when the workers hold different weights, or iterate different data (worker 1's
    samples in another order)."""
    import influence_lib as il

    model, train, test, checkpoints, _ = _problems()
    messages = []
    if strategy.cluster_resolver.task_id == 1:
        model.model.layers[-1].bias.assign(model.model.layers[-1].bias + 1.0)
    try:
        il.FirstOrderInfluenceCalculator(model, train, show_progress=False, strategy=strategy)
    except ValueError as error:
        messages.append(str(error))
    # Another fixed order on each worker (a training set that reshuffles every pass is refused earlier).
    order = train.unbatch().shuffle(64, seed=strategy.cluster_resolver.task_id, reshuffle_each_iteration=False)
    shuffled = order.batch(BATCH)
    tracin = il.TracIn(checkpoints, 0.1, show_progress=False, strategy=strategy)
    try:
        il.extract_only_values(tracin.compute_influence_values(shuffled))
    except ValueError as error:
        messages.append(str(error))
    # A NaN input at index 12 (second batch, rows 10-13 on worker 1): its influence vector, held by worker 1 only,
    # is refused on both workers (worker 0 would otherwise wait for worker 1 in the next collective).
    x, y = (np.concatenate([tensor.numpy() for tensor in parts]) for parts in zip(*train))
    x[12, 0] = np.nan
    broken = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    try:
        il.GradDot(model, show_progress=False, strategy=strategy).top_k(test, broken, K)
    except il.NonFiniteError as error:
        messages.append(str(error))
    return messages


def main(path: str, mode: str) -> None:
    strategy = _configure(mode)
    if mode == "mirrored":
        results = {f"single/{key}": value for key, value in compute(None).items()}
        results.update({f"mirrored/{key}": value for key, value in compute(strategy).items()})
        results.update({f"padded/{key}": value for key, value in padded_outputs(strategy).items()})
    elif mode == "single":
        results = {f"single/{key}": value for key, value in compute(None).items()}
    else:
        results = {f"multiworker/{key}": value for key, value in compute(strategy, every_calculator=False).items()}
        padded = padded_outputs(strategy, ("exact", "tracin"))
        results.update({f"padded/{key}": value for key, value in padded.items()})
        if strategy.cluster_resolver.task_id == 0:
            results.update({f"single/{key}": value for key, value in compute(None, every_calculator=False).items()})
        results["refusals"] = np.array(_refusals(strategy))
    np.savez(path, **results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
