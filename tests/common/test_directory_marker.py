"""atomic_directory never deletes a directory it did not write, and still replaces its own and 0.2.0's."""
import os

import numpy as np
import pytest
import tensorflow as tf

import influence_lib as il
from influence_lib.common.storage import DIRECTORY_MARKER, atomic_directory, recover_directory
from tests.reference_math import softmax_regression


def _user_directory(tmp_path):
    directory = tmp_path / "photos"
    directory.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg", "notes.txt"):
        (directory / name).write_text(name)
    return directory


def _write(path, content):
    with atomic_directory(str(path), "test results") as temporary:
        with open(os.path.join(temporary, "data.txt"), "w", encoding="utf-8") as handle:
            handle.write(content)


def test_a_directory_of_other_files_is_refused_and_left_intact(tmp_path):
    directory = _user_directory(tmp_path)
    with pytest.raises(ValueError, match=r"photos' exists and holds files that are not influence_lib's \(a.jpg, b.jpg, "
                                         r"c.jpg, \.\.\.\): writing the test results there would delete them"):
        _write(directory, "new")
    assert sorted(os.listdir(directory)) == ["a.jpg", "b.jpg", "c.jpg", "notes.txt"]
    assert [entry for entry in os.listdir(tmp_path) if entry != "photos"] == []


def test_its_own_directories_empty_ones_and_new_paths_are_written(tmp_path):
    target = tmp_path / "results"
    _write(target, "first")
    assert sorted(os.listdir(target)) == sorted([DIRECTORY_MARKER, "data.txt"])
    _write(target, "second")
    assert (target / "data.txt").read_text() == "second"
    empty = tmp_path / "empty"
    empty.mkdir()
    _write(empty, "third")
    assert (empty / "data.txt").read_text() == "third"


@pytest.mark.parametrize("written_by_0_2", ["manifest.json", ".influence_lib_result"])
def test_directories_written_by_version_0_2_are_still_replaced(tmp_path, written_by_0_2):
    target = tmp_path / "old"
    target.mkdir()
    (target / written_by_0_2).write_text("{}")
    (target / "batch_000000.npz").write_text("old")
    _write(target, "new")
    assert sorted(os.listdir(target)) == sorted([DIRECTORY_MARKER, "data.txt"])


def test_a_swap_interrupted_between_the_renames_is_recovered_then_replaced(tmp_path):
    target = tmp_path / "results"
    _write(target, "complete")
    os.rename(target, f"{target}.old-deadbeef")
    recover_directory(str(target))
    assert (target / "data.txt").read_text() == "complete"
    _write(target, "next")
    assert (target / "data.txt").read_text() == "next"


def test_the_calculators_refuse_to_save_over_other_files(tmp_path):
    model, dataset, _, _ = softmax_regression(n=8, batch_size=4)
    tracin = il.TracIn([il.InfluenceModel(model)], 0.1, show_progress=False)
    directory = _user_directory(tmp_path)
    with pytest.raises(ValueError, match="influence-vector cache there would delete them"):
        list(tracin.compute_influence_vector(dataset, save_influence_vector_ds_path=str(directory)))
    with pytest.raises(ValueError, match="influence values there would delete them"):
        tracin.estimate_influence_values_in_batches(dataset, dataset, save_influence_value_path=str(directory))
    with pytest.raises(ValueError, match="top-k results there would delete them"):
        tracin.top_k(dataset, dataset, k=2, save_top_k_ds_path=str(directory))
    assert sorted(os.listdir(directory)) == ["a.jpg", "b.jpg", "c.jpg", "notes.txt"]
    cache = tmp_path / "cache"
    first = np.concatenate([v.numpy() for _, v in tracin.compute_influence_vector(dataset, str(cache))])
    again = np.concatenate([v.numpy() for _, v in tracin.compute_influence_vector(dataset, str(cache))])
    np.testing.assert_array_equal(first, again)
    assert DIRECTORY_MARKER in os.listdir(cache)
    saved = tmp_path / "values"
    batches = tracin.estimate_influence_values_in_batches(dataset, dataset, save_influence_value_path=str(saved))
    values = np.concatenate([np.concatenate([v.numpy() for _, v in row], axis=1) for _, row in batches])
    direct = tracin.estimate_influence_values_in_batches(dataset, dataset)
    expected = np.concatenate([np.concatenate([v.numpy() for _, v in row], axis=1) for _, row in direct])
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    tracin.estimate_influence_values_in_batches(dataset, dataset, save_influence_value_path=str(saved))
    assert tf.io.gfile.exists(str(saved / DIRECTORY_MARKER))
