"""The end of a ``pytest -n 2`` run prints no KeyboardInterrupt traceback (tests/quiet_workers.py).

A session whose workers' final teardown outlasts execnet's 5-second grace period (destructors taking
≈ 6 s, as a large TensorFlow session's on a loaded machine) prints one without the plugin and none with it.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("xdist", reason="pytest-xdist is not installed")

TESTS = Path(__file__).resolve().parent

SLOW_TEARDOWN = '''
import time


class Slow:
    def __del__(self):
        time.sleep(0.01)


def pytest_unconfigure(config):
    if hasattr(config, "workerinput"):
        objects = [Slow() for _ in range(600)]
        del objects
'''


def _run(directory: Path, *plugins: str) -> str:
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", *plugins, str(directory)],
        cwd=directory, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])},
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout + completed.stderr


@pytest.mark.slow
def test_workers_with_a_slow_teardown_end_without_a_keyboard_interrupt(tmp_path):
    (tmp_path / "conftest.py").write_text(SLOW_TEARDOWN)
    (tmp_path / "test_two.py").write_text("def test_a():\n    pass\n\n\ndef test_b():\n    pass\n")
    assert "KeyboardInterrupt" in _run(tmp_path)
    assert "KeyboardInterrupt" not in _run(tmp_path, "-p", "quiet_workers")
