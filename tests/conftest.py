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
