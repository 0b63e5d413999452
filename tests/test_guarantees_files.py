"""Files written by the calculators, datasets without labels, and released streams: clear errors naming the path."""
import gc
import os

import keras
import numpy as np
import pytest
import reference_math as rm
import tensorflow as tf

import influence_lib as il
from influence_lib.common.storage import atomic_directory
from influence_lib.common.streams import GeneratorDataset


@pytest.fixture(scope="module")
def setup():
    model, train, x, y = rm.softmax_regression(n=16, d=4, c=3, seed=4, batch_size=8)
    calculator = il.TracIn([il.InfluenceModel(model)], 0.5, show_progress=False)
    kernel, bias = [w.numpy() for w in calculator.models[0].weights]
    gradients = rm.softmax_gradients(x, y, kernel, bias)
    return {"model": model, "train": train, "x": x, "y": y, "calculator": calculator,
            "pairwise": 0.5 * gradients @ gradients.T}


def _matrix(batches):
    return np.concatenate([np.concatenate([v.numpy() for _, v in inner], axis=1) for _, inner in batches], axis=0)


def test_saved_values_and_top_k_replace_an_old_result_completely(setup, tmp_path):
    calculator, train = setup["calculator"], setup["train"]
    values_path, top_path = str(tmp_path / "values"), str(tmp_path / "top")
    for _ in range(2):  # the second call replaces the first result as a whole
        batches = calculator.estimate_influence_values_in_batches(train, train, save_influence_value_path=values_path)
        np.testing.assert_allclose(_matrix(batches), setup["pairwise"], rtol=1e-4, atol=1e-6)
        top = list(calculator.top_k(train, train, k=2, save_top_k_ds_path=top_path))
        np.testing.assert_array_equal(np.concatenate([row[3].numpy() for row in top]),
                                      np.argsort(-setup["pairwise"], axis=1, kind="stable")[:, :2])
    assert sorted(os.listdir(tmp_path)) == ["top", "values"]


@pytest.mark.parametrize("keyword", ["save_influence_value_path", "save_top_k_ds_path"])
def test_result_path_that_is_a_file_is_an_os_error_naming_it(setup, tmp_path, keyword):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    calculator, train = setup["calculator"], setup["train"]
    with pytest.raises(OSError, match=f"Cannot write to '{a_file}': it is a file"):
        if keyword == "save_influence_value_path":
            calculator.estimate_influence_values_in_batches(train, train, save_influence_value_path=str(a_file))
        else:
            calculator.top_k(train, train, k=1, save_top_k_ds_path=str(a_file))
    assert a_file.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_result_location_is_an_os_error_naming_it(setup, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OSError, match="locked"):
            setup["calculator"].top_k(setup["train"], setup["train"], k=1, save_top_k_ds_path=str(locked / "top"))
    finally:
        locked.chmod(0o700)


def test_atomic_directory_never_replaces_a_file(tmp_path):
    a_file = tmp_path / "data"
    a_file.write_text("user data")
    with pytest.raises(OSError, match="it is a file, not a directory"):
        with atomic_directory(str(a_file)):
            pass
    assert a_file.read_text() == "user data"


# --- datasets without labels ---------------------------------------------------------------------------------


def test_representer_self_influence_without_labels_says_labels_are_needed(setup):
    model, x = setup["model"], setup["x"]
    unlabeled = tf.data.Dataset.from_tensor_slices(x).batch(8)
    calculator = il.RepresenterPointL2(model, setup["train"], keras.losses.CategoricalCrossentropy(reduction=None), 0.01,
                                       epochs=3, show_progress=False)
    with pytest.raises(ValueError, match=r"RepresenterPointL2 needs labels.*\(inputs, labels\) batches"):
        calculator.compute_top_k_from_training_dataset(unlabeled, 2)
    with pytest.raises(ValueError, match="needs labels"):
        next(iter(calculator.compute_influence_values(tf.data.Dataset.from_tensor_slices((x,)).batch(8))))


def test_representer_self_influence_with_out_of_range_sparse_labels(setup):
    calculator = il.RepresenterPointL2(setup["model"], setup["train"], keras.losses.CategoricalCrossentropy(reduction=None),
                                       0.01, epochs=3, show_progress=False)
    labels = np.arange(16) % 3
    labels[4] = 9
    sparse = tf.data.Dataset.from_tensor_slices((setup["x"], labels)).batch(8)
    with pytest.raises(ValueError, match="got label 9 for a model with 3 classes"):
        calculator.compute_top_k_from_training_dataset(sparse, 2)


def test_lje_without_labels_names_the_batch_layout(setup):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax", use_bias=False)])
    with pytest.raises(ValueError, match=r"\(inputs, targets\)"):
        il.RepresenterPointLJE(il.InfluenceModel(model), tf.data.Dataset.from_tensor_slices((setup["x"],)).batch(8),
                               il.ExactIHVPFactory(), show_progress=False)


# --- result streams release what they hold ------------------------------------------------------------------


def test_streams_release_their_data_with_the_last_dataset_that_can_iterate_them():
    class Payload:
        pass

    payload = Payload()
    alive = []

    def make_dataset():
        held = payload
        return GeneratorDataset(lambda: iter([tf.constant([1.0]) * (held is not None)]), tf.TensorSpec((None,), tf.float32))

    derived = make_dataset().map(lambda v: v * 2.0)
    gc.collect()
    assert [float(v) for v in derived.unbatch()] == [2.0]  # graph-mode iteration of a derived dataset
    import weakref

    alive.append(weakref.ref(payload))
    del payload, derived
    gc.collect()
    assert alive[0]() is None


def test_result_path_below_a_file_is_an_os_error_naming_it(setup, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    target = str(a_file / "top")
    with pytest.raises(OSError, match=f"Cannot write to '{target}'"):
        setup["calculator"].top_k(setup["train"], setup["train"], k=1, save_top_k_ds_path=target)
    with pytest.raises(OSError, match="Cannot write"):
        list(setup["calculator"].compute_influence_vector(setup["train"], save_influence_vector_ds_path=target))


def _snapshot_file(directory):
    import glob

    return [f for f in glob.glob(os.path.join(directory, "**", "*.snapshot"), recursive=True)][0]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_saved_results_are_a_clear_error_naming_the_path(setup, tmp_path, damage):
    calculator, train = setup["calculator"], setup["train"]
    top_path, values_path = str(tmp_path / "top"), str(tmp_path / "values")
    top = calculator.top_k(train, train, k=2, save_top_k_ds_path=top_path)
    batches = calculator.estimate_influence_values_in_batches(train, train, save_influence_value_path=values_path)
    for directory in (top_path, os.path.join(values_path, "batch_000001")):
        target = _snapshot_file(directory)
        raw = bytearray(open(target, "rb").read())
        if damage == "flip":
            raw[len(raw) // 2] ^= 0x10
        else:
            raw = raw[: len(raw) // 3]
        open(target, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match=f"saved top-k results at '{top_path}' are incomplete or corrupt"):
        list(top)
    with pytest.raises(ValueError, match="saved influence values at .*batch_000001' are incomplete or corrupt"):
        _matrix(batches)


@pytest.mark.parametrize("keyword", ["save_influence_value_path", "save_top_k_ds_path", "save_influence_vector_path"])
def test_a_directory_of_other_files_is_never_replaced(setup, tmp_path, keyword):
    calculator, train = setup["calculator"], setup["train"]
    other = tmp_path / "results"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match=f"'{other}' exists and (holds files that are not|is not an)"):
        if keyword == "save_top_k_ds_path":
            calculator.top_k(train, train, k=1, save_top_k_ds_path=str(other))
        else:
            calculator.estimate_influence_values_in_batches(train, train, **{keyword: str(other)})
    assert (other / "thesis.tex").read_text() == "precious" and os.listdir(other) == ["thesis.tex"]


def test_an_old_format_cache_is_reported_as_such(setup, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "influence_lib_cache.json").write_text("{}")
    with pytest.raises(ValueError, match="older version of influence_lib.*recompute"):
        list(setup["calculator"].top_k(setup["train"], setup["train"], k=1, load_influence_vector_ds_path=str(old)))
