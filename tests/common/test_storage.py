"""Fingerprinted, atomic, resumable storage: fingerprints, shard stores, directory swaps under SIGKILL."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

from influence_lib.common import storage


def test_digest_is_order_independent_and_value_sensitive():
    assert storage.digest({"a": 1, "b": [1, 2]}) == storage.digest({"b": [1, 2], "a": 1})
    assert storage.digest({"a": 1}) != storage.digest({"a": 1.5})


def test_fingerprint_variables_sees_values_shapes_and_dtypes():
    base = [tf.Variable(np.ones((2, 3), np.float32)), tf.Variable(np.zeros(3, np.float32))]
    same = [np.ones((2, 3), np.float32), np.zeros(3, np.float32)]
    assert storage.fingerprint_variables(base) == storage.fingerprint_variables(same)
    changed = [np.ones((2, 3), np.float32), np.array([0, 0, 1e-7], np.float32)]
    assert storage.fingerprint_variables(base) != storage.fingerprint_variables(changed)
    assert storage.fingerprint_variables([np.ones((3, 2), np.float32)]) != storage.fingerprint_variables(same[:1])
    assert storage.fingerprint_variables([np.ones((2, 3), np.float64)]) != storage.fingerprint_variables(same[:1])


def test_fingerprint_dataset_reads_only_the_head():
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    first = storage.fingerprint_dataset(tf.data.Dataset.from_tensor_slices(x).batch(4))
    assert first["head_sizes"] == [4, 4] and first["cardinality"] == 5
    other = x.copy()
    other[1, 1] += 1
    assert storage.fingerprint_dataset(tf.data.Dataset.from_tensor_slices(other).batch(4))["head"] != first["head"]
    assert storage.fingerprint_dataset(tf.data.Dataset.from_tensor_slices(x).batch(5)) != first
    # An infinite dataset is fingerprinted without hanging.
    assert storage.fingerprint_dataset(tf.data.Dataset.from_tensor_slices(x).batch(4).repeat())["cardinality"] == -1


def test_shard_store_round_trip_resume_and_mismatch(tmp_path):
    path = tmp_path / "store"
    store = storage.ShardStore(str(path), {"weights": "abc", "damping": 0.1}, what="test cache")
    store.write("b-0001", values=np.arange(3.0), indices=np.array([1, 2, 3]))
    store.write("b-0000", values=np.ones(2))
    assert store.names() == ["b-0000", "b-0001"] and store.completion() is None
    store.mark_complete(batches=2)
    reopened = storage.ShardStore(str(path), {"damping": 0.1, "weights": "abc"}, what="test cache")
    np.testing.assert_array_equal(reopened.read("b-0001")["indices"], [1, 2, 3])
    assert reopened.completion() == {"batches": 2}
    with pytest.raises(ValueError, match=r"different setup \(differs in damping: stored 0.1 vs now 0.2\)"):
        storage.ShardStore(str(path), {"weights": "abc", "damping": 0.2}, what="test cache")
    fresh = storage.ShardStore(str(path), {"weights": "abc", "damping": 0.2}, what="test cache", overwrite=True)
    assert fresh.names() == []
    with pytest.raises(FileNotFoundError, match="no complete shard 'b-0000'"):
        fresh.read("b-0000")


@pytest.mark.parametrize("damage", ["flip", "truncate", "checksum"])
def test_damaged_shards_are_reported_as_corrupt(tmp_path, damage):
    store = storage.ShardStore(str(tmp_path / "s"), {"k": 1})
    store.write("x", values=np.arange(100.0))
    shard = tmp_path / "s" / "x.npz"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 3]))
    else:
        (tmp_path / "s" / "x.npz.sha256").write_text("0" * 64)
    with pytest.raises(ValueError, match="is corrupt.*recompute"):
        store.read("x")


def test_corrupt_manifest_and_bad_paths(tmp_path):
    path = tmp_path / "s"
    storage.ShardStore(str(path), {"k": 1})
    (path / "manifest.json").write_text('{"fingerprint": {"k"')
    with pytest.raises(ValueError, match="manifest at .* is corrupt"):
        storage.ShardStore(str(path), {"k": 1})
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OSError, match="is a file, not a directory"):
        storage.ShardStore(str(a_file), {"k": 1})
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a cache"):
        storage.ShardStore(str(other), {"k": 1})
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="Invalid shard name"):
        storage.ShardStore(str(tmp_path / "t"), {"k": 1}).write("../escape", a=np.ones(1))


def test_read_json_reports_corruption(tmp_path):
    path = tmp_path / "m.json"
    storage.atomic_write_json(str(path), {"a": 1})
    assert storage.read_json(str(path)) == {"a": 1}
    path.write_text("[1, 2")
    with pytest.raises(ValueError, match="is corrupt"):
        storage.read_json(str(path), "metadata")


def test_atomic_directory_keeps_the_old_version_on_error(tmp_path):
    target = tmp_path / "cache"
    with storage.atomic_directory(str(target)) as temporary:
        (tmp_path / "cache.marker").write_text("")
        open(os.path.join(temporary, "v"), "w").write("old")
    with pytest.raises(RuntimeError):
        with storage.atomic_directory(str(target)) as temporary:
            open(os.path.join(temporary, "v"), "w").write("new")
            raise RuntimeError("interrupted")
    assert (target / "v").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "cache.marker"]


def test_interrupted_swap_is_rolled_back(tmp_path):
    target = tmp_path / "cache"
    old = tmp_path / "cache.old-abc"
    old.mkdir()
    (old / "v").write_text("old")
    (tmp_path / "cache.tmp-def").mkdir()
    storage.recover_directory(str(target))
    assert (target / "v").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


_WRITER = textwrap.dedent(
    """
    import importlib.util, os, sys, time
    spec = importlib.util.spec_from_file_location("storage", sys.argv[3])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    atomic_directory = module.atomic_directory
    with atomic_directory(sys.argv[1]) as temporary:
        for index in range(40):
            open(os.path.join(temporary, f"part{index:02d}"), "w").write(sys.argv[2])
            time.sleep(0.01)
    """
)


def _wait_for_parts(tmp_path, count: int, process) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        temporary = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
        if temporary and len(list(temporary[0].iterdir())) >= count:
            return
        time.sleep(0.002)


@pytest.mark.parametrize("parts_before_kill", [1, 20, 40])
def test_a_killed_writer_leaves_the_old_or_the_new_directory(tmp_path, parts_before_kill):
    target = tmp_path / "cache"
    writer = [sys.executable, "-c", _WRITER, str(target)]
    subprocess.run([*writer, "old", storage.__file__], check=True, timeout=120)
    process = subprocess.Popen([*writer, "new", storage.__file__])
    _wait_for_parts(tmp_path, parts_before_kill, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    storage.recover_directory(str(target))
    parts = [p for p in target.iterdir() if p.name != storage.DIRECTORY_MARKER]
    contents = {p.read_text() for p in parts}
    assert len(parts) == 40 and contents in ({"old"}, {"new"})
    assert (target / storage.DIRECTORY_MARKER).exists()
    if parts_before_kill < 40:
        assert contents == {"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_library_fingerprint_is_the_hash_of_the_installed_source():
    import hashlib
    import pathlib

    import influence_lib
    from influence_lib.common.storage import library_fingerprint

    root = pathlib.Path(influence_lib.__file__).parent
    hasher = hashlib.sha256()
    for path in sorted(root.rglob("*.py"), key=lambda p: str(p.relative_to(root))):
        hasher.update(str(path.relative_to(root)).encode())
        hasher.update(hashlib.sha256(path.read_bytes()).digest())
    assert library_fingerprint() == hasher.hexdigest()
