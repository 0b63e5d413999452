"""Shared test settings: quiet TensorFlow, deterministic seeds, float64 NumPy references, quiet xdist workers."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest

from quiet_workers import pytest_sessionfinish  # noqa: F401  (a hook: no KeyboardInterrupt from xdist workers)


@pytest.fixture(autouse=True)
def _seed_everything():
    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield


@pytest.fixture
def bars(monkeypatch):
    """The descriptions of the progress bars shown while the test runs (tqdm replaced by a recorder)."""
    from influence_lib.common import progress as progress_module

    shown = []

    class Bar:
        def __init__(self, iterable, desc, **kwargs):
            shown.append(desc)
            self.iterable = iterable

        def __enter__(self):
            return iter(self.iterable)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(progress_module, "tqdm", Bar)
    return shown
