"""The benchmark's first-order factory with K-FAC / EK-FAC through every layer."""
import numpy as np
import pytest
import tensorflow as tf

import influence_lib as il
from influence_lib.benchmark.factories import FirstOrderFactory
from influence_lib.benchmark.training import MLPTrainingProcedure


@pytest.mark.parametrize("ihvp", ["kfac", "ekfac"])
def test_first_order_factory_scores_every_layer_with_kronecker_curvature(ihvp):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 30)]
    trained = MLPTrainingProcedure((5,), epochs=2, batch_size=10).train(x, y, x, y, seed=0)
    train_set = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)
    scores = FirstOrderFactory(ihvp, damping=0.05, start_layer=0, last_layer=-1).score(trained, train_set)
    model = il.InfluenceModel(trained.model, start_layer=0, last_layer=-1)
    assert len(model.closed_form_layers) == 2
    kind = il.EKFACIHVP if ihvp == "ekfac" else il.KFACIHVP
    fitted = kind(model, train_set, damping=0.05, show_progress=False)
    gradients = model.batch_jacobian_tensor((x, y))
    expected = np.sum(gradients.numpy() * fitted.ihvp(gradients).numpy(), axis=1)
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
