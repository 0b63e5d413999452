"""``show_progress=False`` on a calculator also silences the IHVP calculator it builds from a factory."""
import dataclasses

import keras
import numpy as np
import tensorflow as tf

import influence_lib as il
from influence_lib.common.progress import quieted
from influence_lib.curvature.factory import ExactIHVPFactory
from tests.reference_math import softmax_regression


def test_first_order_with_a_factory_shows_no_bar_when_asked(bars):
    model, dataset, _, _ = softmax_regression(n=16, batch_size=8)
    influence_model = il.InfluenceModel(model)
    factory = ExactIHVPFactory(damping=0.01, curvature="hessian")
    il.FirstOrderInfluenceCalculator(influence_model, dataset, factory, show_progress=False)
    assert bars == []
    assert factory.show_progress is True
    il.FirstOrderInfluenceCalculator(influence_model, dataset, factory, show_progress=True)
    assert bars, "the factory's own show_progress=True shows the Hessian bar when the calculator shows bars"


def test_representer_lje_with_a_factory_shows_no_bar_when_asked(bars):
    model = keras.Sequential([
        keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2, activation="softmax", use_bias=False),
    ])
    x = np.random.normal(size=(12, 3)).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[np.arange(12) % 2]
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(6)
    il.RepresenterPointLJE(il.InfluenceModel(model), dataset, ExactIHVPFactory(damping=0.01), show_progress=False)
    assert bars == []


def test_quieted_copies_only_dataclasses_with_the_field():
    factory = ExactIHVPFactory()
    assert quieted(factory, True) is factory
    quiet = quieted(factory, False)
    assert quiet.show_progress is False and factory.show_progress is True
    assert dataclasses.replace(quiet, show_progress=True) == factory

    @dataclasses.dataclass
    class Other:
        damping: float = 0.1

    other = Other()
    assert quieted(other, False) is other
    assert quieted("exact", False) == "exact"
