"""The influence-vector disk cache: reused only for what made it, crash-safe, corruption reported clearly."""
import gc
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap

import keras
import numpy as np
import pytest
import reference_math as rm
import tensorflow as tf

import influence_lib as il
from influence_lib.common.vector_cache import open_vectors, read_vectors, save_vectors


@pytest.fixture(scope="module")
def problem():
    model, train, x, y = rm.softmax_regression(n=48, d=4, c=3, seed=5, batch_size=16)
    rng = np.random.default_rng(3)
    x_test = rng.normal(size=(6, 4)).astype(np.float32)
    y_test = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 6)]
    return {"model": model, "train": train, "x": x, "y": y, "test": tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(3),
            "x_test": x_test, "y_test": y_test}


def _first_order(model, train, **kwargs):
    """Undamped exact influence by default, to compare with the NumPy pseudo-inverse of ``_reference``."""
    kwargs.setdefault("ihvp_calculator", il.ExactIHVPFactory(damping=0.0, show_progress=False))
    return il.FirstOrderInfluenceCalculator(il.InfluenceModel(model), train, show_progress=False, **kwargs)


def _other_weights(model, shift=0.7):
    clone = keras.models.clone_model(model)
    clone.set_weights([w + shift for w in model.get_weights()])
    return clone


def _reference(model, x, y, x_test, y_test):
    """``g_t H⁺ g_z`` in float64 NumPy for a softmax regression."""
    kernel, bias = [w.astype(np.float64) for w in model.get_weights()]
    inverse = rm.pseudo_inverse(rm.softmax_hessian(x, kernel, bias))
    return rm.softmax_gradients(x_test, y_test, kernel, bias) @ inverse @ rm.softmax_gradients(x, y, kernel, bias).T


def _pairwise(batches) -> np.ndarray:
    return np.concatenate([np.concatenate([v.numpy() for _, v in inner], axis=1) for _, inner in batches], axis=0)


def _close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def _save(calculator, train, path):
    list(calculator.compute_influence_vector(train, save_influence_vector_ds_path=path))


def _load(calculator, problem, path, train=None):
    return _pairwise(calculator.estimate_influence_values_in_batches(
        problem["test"], problem["train"] if train is None else train, il.CACHE.DISK, load_influence_vector_path=path
    ))


# --- fingerprint: what made the vectors ----------------------------------------------------------------------


def test_reload_gives_the_recomputed_values(problem, tmp_path):
    path = str(tmp_path / "cache")
    _save(_first_order(problem["model"], problem["train"]), problem["train"], path)
    fresh = _first_order(problem["model"], problem["train"])
    expected = _reference(problem["model"], problem["x"], problem["y"], problem["x_test"], problem["y_test"])
    _close(_load(fresh, problem, path), expected)


def test_other_weights_same_architecture_are_refused(problem, tmp_path):
    path = str(tmp_path / "cache")
    _save(_first_order(problem["model"], problem["train"]), problem["train"], path)
    other = _other_weights(problem["model"])
    calculator = _first_order(other, problem["train"])
    with pytest.raises(ValueError, match=r"made by a different setup: .*weights \(the model's weights changed\)"):
        _load(calculator, problem, path)
    # Recomputing over the refused cache gives the other model's values (never the stale ones).
    _save(calculator, problem["train"], path)
    _close(_load(calculator, problem, path),
           _reference(other, problem["x"], problem["y"], problem["x_test"], problem["y_test"]))


def test_frozen_earlier_layer_weights_are_part_of_the_fingerprint(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2, activation="softmax")])
    x = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[np.arange(12) % 2]
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    path = str(tmp_path / "cache")
    _save(_first_order(model, train), train, path)
    model.layers[0].kernel.assign(model.layers[0].kernel + 1.0)  # not watched, but changes the features
    with pytest.raises(ValueError, match="weights"):
        list(_first_order(model, train).top_k(train, train, k=2, load_influence_vector_ds_path=path))


def test_other_training_set_of_same_size_and_batching_is_refused(problem, tmp_path):
    path = str(tmp_path / "cache")
    _save(_first_order(problem["model"], problem["train"]), problem["train"], path)
    other_x = problem["x"].copy()
    other_x[-1] += 1.0  # only the last batch differs
    other = tf.data.Dataset.from_tensor_slices((other_x, problem["y"])).batch(16)
    with pytest.raises(ValueError, match=r"data \(another training set, order or batching"):
        _load(_first_order(problem["model"], problem["train"]), problem, path, train=other)
    rebatched = problem["train"].unbatch().batch(12)
    with pytest.raises(ValueError, match="data"):
        _load(_first_order(problem["model"], problem["train"]), problem, path, train=rebatched)


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"normalize": True}, "normalize"),
        ({"ihvp_calculator": "cgd"}, "calculator"),
        ({"n_samples_for_hessian": 40}, "state"),
    ],
)
def test_other_settings_are_refused_and_named(problem, tmp_path, kwargs, named):
    path = str(tmp_path / "cache")
    _save(_first_order(problem["model"], problem["train"]), problem["train"], path)
    with pytest.raises(ValueError, match=f"different setup: .*{named}"):
        _load(_first_order(problem["model"], problem["train"], **kwargs), problem, path)


def test_damping_and_watched_layers_are_named(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(2, activation="softmax")])
    x = np.random.default_rng(1).normal(size=(8, 3)).astype(np.float32)
    train = tf.data.Dataset.from_tensor_slices((x, np.eye(2, dtype=np.float32)[np.arange(8) % 2])).batch(4)
    path = str(tmp_path / "cache")

    def calculator(damping=0.1, **model_kwargs):
        influence_model = il.InfluenceModel(model, **model_kwargs)
        ihvp = il.ExactIHVP(influence_model, train, damping=damping)
        return il.FirstOrderInfluenceCalculator(influence_model, train, ihvp_calculator=ihvp, show_progress=False)

    _save(calculator(), train, path)
    with pytest.raises(ValueError, match="damping"):
        list(calculator(damping=0.5).top_k(train, train, k=1, load_influence_vector_ds_path=path))
    with pytest.raises(ValueError, match="watched_layers"):
        list(calculator(start_layer=0, last_layer=1).top_k(train, train, k=1, load_influence_vector_ds_path=path))


def test_tracin_and_arnoldi_fingerprints(problem, tmp_path):
    influence_model = il.InfluenceModel(problem["model"])
    other_model = il.InfluenceModel(_other_weights(problem["model"], 0.2))
    path = str(tmp_path / "tracin")
    _save(il.TracIn([influence_model, other_model], [0.1, 0.2], show_progress=False), problem["train"], path)
    fresh = il.TracIn([il.InfluenceModel(problem["model"]), other_model], [0.1, 0.2], show_progress=False)
    from_cache = _load(fresh, problem, path)
    recomputed = _pairwise(fresh.estimate_influence_values_in_batches(problem["test"], problem["train"]))
    np.testing.assert_allclose(from_cache, recomputed, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="learning_rates"):
        list(il.TracIn([influence_model, other_model], [0.1, 0.3], show_progress=False).top_k(
            problem["test"], problem["train"], k=1, load_influence_vector_ds_path=path))
    with pytest.raises(ValueError, match="weights"):
        list(il.TracIn([influence_model, influence_model], [0.1, 0.2], show_progress=False).top_k(
            problem["test"], problem["train"], k=1, load_influence_vector_ds_path=path))
    path = str(tmp_path / "arnoldi")

    def arnoldi(seed):
        return il.ArnoldiInfluenceCalculator(influence_model, problem["train"], subspace_dim=6, k_largest_eig_vals=4,
                                             seed=seed, show_progress=False)

    _save(arnoldi(0), problem["train"], path)
    with pytest.raises(ValueError, match="seed"):
        list(arnoldi(1).top_k(problem["test"], problem["train"], k=1, load_influence_vector_ds_path=path))


# --- corruption ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(problem, tmp_path_factory):
    calculator = _first_order(problem["model"], problem["train"])
    path = str(tmp_path_factory.mktemp("pristine") / "cache")
    _save(calculator, problem["train"], path)
    return calculator, path


@pytest.fixture
def saved(pristine, tmp_path):
    """A fresh copy of one complete cache, to damage."""
    calculator, source = pristine
    path = str(tmp_path / "cache")
    shutil.copytree(source, path)
    return calculator, path


def _shard(path, index=1):
    return os.path.join(path, f"batch_{index:06d}.npz")


def _truncate(path):
    with open(_shard(path), "r+b") as handle:
        handle.truncate(os.path.getsize(_shard(path)) // 2)


def _flip_bit(path):
    with open(_shard(path), "r+b") as handle:
        handle.seek(os.path.getsize(_shard(path)) - 40)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x10]))


def _write(name, text):
    def corrupt(path):
        with open(os.path.join(path, name), "w", encoding="utf-8") as handle:
            handle.write(text)
    return corrupt


@pytest.mark.parametrize(
    "corrupt, error, match",
    [
        (_truncate, ValueError, "corrupt.*delete"),
        (_flip_bit, ValueError, "corrupt.*delete"),
        (_write("manifest.json", '{"fingerprint": {"calcul'), ValueError, "manifest at .* is corrupt.*delete it or recompute"),
        (_write("manifest.json", "[1, 2]"), ValueError, "corrupt"),
        (_write("manifest.json", '{"other": 1}'), ValueError, "corrupt"),
        (_write("complete.json", "{not json"), ValueError, "corrupt.*delete it or recompute"),
        (lambda path: os.remove(os.path.join(path, "complete.json")), ValueError, "is incomplete; delete it or recompute"),
        (lambda path: os.remove(_shard(path)), ValueError, "incomplete.*batch_000001.*delete it or recompute"),
        (lambda path: os.remove(_shard(path) + ".sha256"), ValueError, "incomplete.*delete it or recompute"),
        (_write("batch_000001.npz.sha256", "0" * 64), ValueError, "checksum mismatch"),
    ],
)
def test_corrupt_cache_is_a_clear_error_naming_the_path(problem, saved, corrupt, error, match):
    calculator, path = saved
    corrupt(path)
    with pytest.raises(error, match=match) as caught:
        _load(calculator, problem, path)
    assert os.path.abspath(path) in str(caught.value) or path in str(caught.value)


def test_missing_and_foreign_directories(problem, saved, tmp_path):
    calculator = saved[0]
    with pytest.raises(FileNotFoundError, match="No influence-vector cache"):
        _load(calculator, problem, str(tmp_path / "missing"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="No influence-vector cache"):
        _load(calculator, problem, str(foreign))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(OSError, match="is a file, not a directory"):
        _save(calculator, problem["train"], str(a_file))
    assert a_file.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_location_is_an_os_error_naming_the_path(problem, saved, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OSError, match="locked"):
            _save(saved[0], problem["train"], str(locked / "cache"))
    finally:
        locked.chmod(0o700)


# --- crash safety --------------------------------------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import os, signal, sys, types

    # Load the storage modules without the package's __init__ (and so without TensorFlow).
    for name, folder in (("influence_lib", ""), ("influence_lib.common", "common")):
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(sys.argv[3], folder)]
        sys.modules[name] = package
    import numpy as np
    from influence_lib.common import storage, vector_cache

    path, kill_at = sys.argv[1], sys.argv[2]
    renames = [0]
    real_rename = os.rename
    real_mark = storage.ShardStore.mark_complete

    def rename(source, target):
        real_rename(source, target)
        renames[0] += 1
        if kill_at == f"rename{renames[0]}":
            os.kill(os.getpid(), signal.SIGKILL)

    def mark_then_die(store, **info):
        real_mark(store, **info)
        os.kill(os.getpid(), signal.SIGKILL)

    def batches():
        for index in range(4):
            if kill_at == f"batch{index}":
                os.kill(os.getpid(), signal.SIGKILL)
            yield np.full((5, 3), 2.0 + index, np.float32)

    storage.os.rename = rename
    if kill_at == "complete":
        storage.ShardStore.mark_complete = mark_then_die
    vector_cache.save_vectors(batches(), path, {"version": "new"})
    """
)


def _vectors(path, version):
    return np.concatenate(list(read_vectors(open_vectors(path, {"version": version}))))


def test_a_writer_killed_at_any_point_leaves_the_old_or_the_new_cache_never_a_mix(tmp_path):
    old = [np.full((5, 3), 1.0 + index, np.float32) for index in range(3)]
    new = np.concatenate([np.full((5, 3), 2.0 + index, np.float32) for index in range(4)])
    expected = {"batch0": "old", "batch2": "old", "complete": "old", "rename1": "old", "rename2": "new", "none": "new"}
    package = os.path.dirname(os.path.abspath(il.__file__))
    paths = {point: str(tmp_path / point / "cache") for point in expected}
    for path in paths.values():
        save_vectors(iter(old), path, {"version": "old"})
    writers = {  # independent writer processes, run in parallel
        point: subprocess.Popen([sys.executable, "-c", _WRITER, path, point, package],
                                stderr=subprocess.PIPE)
        for point, path in paths.items()
    }
    for point, outcome in expected.items():
        path = paths[point]
        _, stderr = writers[point].communicate(timeout=120)
        assert writers[point].returncode == (0 if point == "none" else -signal.SIGKILL), (point, stderr.decode()[-2000:])
        if outcome == "old":
            np.testing.assert_array_equal(_vectors(path, "old"), np.concatenate(old))
            with pytest.raises(ValueError, match="different setup: version"):
                _vectors(path, "new")
        else:
            np.testing.assert_array_equal(_vectors(path, "new"), new)
            with pytest.raises(ValueError, match="different setup: version"):
                _vectors(path, "old")
        assert not glob.glob(path + ".tmp-*") and not glob.glob(path + ".old-*"), point


# --- temporary caches ----------------------------------------------------------------------------------------


def test_temporary_disk_cache_is_removed_when_the_result_is_released(problem, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    calculator = _first_order(problem["model"], problem["train"])
    expected = _reference(problem["model"], problem["x"], problem["y"], problem["x_test"], problem["y_test"])
    batches = calculator.estimate_influence_values_in_batches(problem["test"], problem["train"], il.CACHE.DISK)
    assert len(glob.glob(str(tmp_path / "influence_vectors_*"))) == 1
    _close(_pairwise(batches), expected)
    top = calculator.top_k(problem["test"], problem["train"], k=2, influence_vector_in_cache=il.CACHE.DISK)
    assert len(glob.glob(str(tmp_path / "influence_vectors_*"))) == 2
    assert all(finalizer.atexit for finalizer in _finalizers())
    del batches, top
    gc.collect()
    assert glob.glob(str(tmp_path / "influence_vectors_*")) == []


@pytest.mark.slow
def test_temporary_disk_cache_is_removed_at_exit(tmp_path):
    script = textwrap.dedent(
        """
        import sys, tempfile
        tempfile.tempdir = sys.argv[1]
        from influence_lib.influence.base import _TemporaryCache
        kept = _TemporaryCache()
        open(kept.directory + "/marker", "w").close()
        """
    )
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env=environment, timeout=120)
    assert glob.glob(str(tmp_path / "influence_vectors_*")) == []


def _finalizers():
    from influence_lib.influence.base import _TemporaryCache

    return [item._cleanup for item in gc.get_objects() if isinstance(item, _TemporaryCache)]


def test_fingerprint_is_json_and_covers_data_contents(problem):
    calculator = _first_order(problem["model"], problem["train"])
    fingerprint = calculator._disk_fingerprint(problem["train"])
    json.dumps(fingerprint)
    assert fingerprint["data"]["head_sizes"] == [16, 16, 16]
    assert fingerprint["ihvp_calculator.damping"] == 0.0
