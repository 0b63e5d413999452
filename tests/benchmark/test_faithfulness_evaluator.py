"""Attributions of the method registry against NumPy float64, configuration and sweeps, and a tiny
end-to-end LDS run on digits."""
import json

import numpy as np
import pytest
from reference_math import margin_gradients, softmax_gradients, softmax_hessian, softmax_regression

from influence_lib.benchmark.factories import (
    METHODS,
    FirstOrderFactory,
    RandomFactory,
    configure,
    parse_setting,
    resolve_methods,
    sweep_damping,
)
from influence_lib.benchmark.faithfulness_evaluator import FaithfulnessEvaluator
from influence_lib.benchmark.faithfulness_report import faithfulness_table, faithfulness_to_dict, plot_faithfulness
from influence_lib.benchmark.retraining import RetrainingData, SubsetRetraining
from influence_lib.benchmark.training import SGDTrainingProcedure, TrainedModel


@pytest.mark.parametrize("measurement", ["loss", "margin"])
def test_first_order_attributions_match_numpy(measurement):
    model, train_set, x, y = softmax_regression(n=48, d=4, c=3)
    test_x, test_y = x[:7] + 0.1, y[:7]
    import tensorflow as tf

    test_set = tf.data.Dataset.from_tensor_slices((test_x, test_y)).batch(4)
    trained = TrainedModel(model, 0.0, 0.0, seed=0)
    scores = FirstOrderFactory("exact", damping=0.1).attribute(trained, train_set, test_set, measurement)
    kernel, bias = (w.astype(np.float64) for w in model.layers[-1].get_weights())
    hessian = softmax_hessian(x, kernel, bias) + 0.1 * np.eye(kernel.size + bias.size)
    train_gradients = softmax_gradients(x, y, kernel, bias)
    if measurement == "loss":
        test_gradients = softmax_gradients(test_x, test_y, kernel, bias)
    else:
        test_gradients = margin_gradients(test_x, test_y.argmax(axis=1), kernel, bias)
    # Including a training sample changes the measurement by −g_tᵀ H⁻¹ g_i (the library's I has no minus sign).
    expected = -test_gradients @ np.linalg.solve(hessian, train_gradients.T)
    assert scores.shape == (7, 48)
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_only_pairwise_methods_attribute():
    with pytest.raises(TypeError, match="only scores training samples"):
        METHODS["loss"].attribute(None, None, None)
    pairwise = resolve_methods("all", pairwise_only=True)
    assert "first_order_exact" in pairwise and "tracin" in pairwise and "loss" not in pairwise
    with pytest.raises(ValueError, match="cannot attribute"):
        resolve_methods("first_order_exact,weights_boundary", pairwise_only=True)


def test_configure_and_sweep_set_hyper_parameters():
    factories = resolve_methods("first_order_exact,first_order_cg,tracin,random")
    settings = dict([parse_setting("damping=1e-3"), parse_setting("first_order_cg.n_opt_iters=7")])
    configured = configure(factories, settings)
    assert configured["first_order_exact"].damping == 1e-3 and configured["first_order_cg"].damping == 1e-3
    assert configured["first_order_cg"].n_opt_iters == 7 and factories["first_order_cg"].n_opt_iters == 30
    assert configure(factories, {"first_order_cg.n_opt_iters": 50.0})["first_order_cg"].n_opt_iters == 50
    with pytest.raises(ValueError, match="must be an integer"):
        configure(factories, {"first_order_cg.n_opt_iters": 2.7})
    with pytest.raises(ValueError, match="No chosen method has a field 'projection_dim'"):
        configure(factories, {"projection_dim": 10})
    with pytest.raises(ValueError, match="names method 'nope'"):
        configure(factories, {"nope.damping": 1.0})
    with pytest.raises(ValueError, match="field=value"):
        parse_setting("damping")
    assert parse_setting("start_layer=none") == ("start_layer", None) and parse_setting("ihvp=cgd") == ("ihvp", "cgd")
    swept = sweep_damping(factories, (1e-3, 0.1))
    assert list(swept) == [
        "first_order_exact[damping=0.001]", "first_order_exact[damping=0.1]", "first_order_cg[damping=0.001]",
        "first_order_cg[damping=0.1]", "tracin", "random",
    ]
    assert swept["first_order_cg[damping=0.1]"].damping == 0.1
    with pytest.raises(ValueError, match="damping grid"):
        sweep_damping(factories, (-1.0,))


def digits_data(n_train=150, n_test=30):
    from influence_lib.benchmark.datasets import load_digits

    data = load_digits().subset(n_train, n_test)
    eye = np.eye(10, dtype=np.float32)
    return RetrainingData(
        data.x_train.reshape(n_train, -1), eye[data.y_train], data.x_test.reshape(n_test, -1), eye[data.y_test]
    )


def test_tiny_end_to_end_lds_on_digits(tmp_path):
    procedure = SGDTrainingProcedure(epochs=5, batch_size=32, learning_rate=0.1)
    evaluator = FaithfulnessEvaluator(
        digits_data(), procedure, SubsetRetraining(nb_subsets=8), noise_ceiling=True, nb_loo=3,
        store_path=str(tmp_path / "store"), show_progress=False,
    )
    factories = {"first_order_exact": FirstOrderFactory("exact", damping=0.01), "tracin": METHODS["tracin"],
                 "random": RandomFactory(), "rps_lje": METHODS["rps_lje"]}
    results = evaluator.evaluate(factories)
    ceiling = evaluator.noise_ceiling()
    assert 0.2 < ceiling.ceiling <= 1.0
    for name in ("first_order_exact", "tracin"):
        lds = results[name].lds
        assert lds.mean > 0.15 and lds.mean > results["random"].lds.mean + 2 * lds.standard_error, name
        assert set(results[name].loo) == {"pearson", "spearman"}
    assert abs(results["random"].lds.mean) < 4 * results["random"].lds.standard_error
    assert results["rps_lje"].lds is None and "bias" in results["rps_lje"].error
    table = faithfulness_table(results, ceiling, markdown=True)
    assert "| tracin |" in table and "noise ceiling" in table and "failed" in table.splitlines()[-2]
    summary = json.loads(json.dumps(faithfulness_to_dict(results, evaluator.config(), ceiling)))
    assert summary["methods"]["tracin"]["lds"]["mean"] == pytest.approx(results["tracin"].lds.mean)
    assert summary["config"]["setup"]["nb_subsets"] == 8
    assert plot_faithfulness(results, ceiling) is not None
    # The stored ground truth is reused: a second evaluator trains only the model to explain.
    again = FaithfulnessEvaluator(
        digits_data(), procedure, SubsetRetraining(nb_subsets=8), noise_ceiling=True, nb_loo=3,
        store_path=str(tmp_path / "store"), show_progress=False,
    )
    np.testing.assert_array_equal(again.ground_truth().measurements, evaluator.ground_truth().measurements)
    # ... and the attributions are read back from the cache (same seconds, same LDS up to float32 storage).
    cached = again.evaluate({"tracin": METHODS["tracin"]})["tracin"]
    assert cached.seconds == results["tracin"].seconds
    assert cached.lds.mean == pytest.approx(results["tracin"].lds.mean, abs=1e-3)
    # Another version of the library (another default, say) recomputes instead of reading the cache.
    import influence_lib.benchmark.faithfulness_evaluator as evaluator_module

    original = evaluator_module.library_fingerprint
    evaluator_module.library_fingerprint = lambda: "another version"
    try:
        recomputed = again.evaluate({"tracin": METHODS["tracin"]})["tracin"]
    finally:
        evaluator_module.library_fingerprint = original
    assert recomputed.seconds != results["tracin"].seconds


def test_evaluator_checks_its_arguments():
    data = digits_data(20, 5)
    with pytest.raises(TypeError, match="TrainingProcedure"):
        FaithfulnessEvaluator(data, object())
    with pytest.raises(ValueError, match="nb_loo"):
        FaithfulnessEvaluator(data, SGDTrainingProcedure(), nb_loo=2)
    with pytest.raises(ValueError, match="nb_subsets"):
        SubsetRetraining(nb_subsets=2)
    evaluator = FaithfulnessEvaluator(data, SGDTrainingProcedure(), show_progress=False)
    with pytest.raises(ValueError, match="only scores training samples"):
        evaluator.evaluate({"loss": METHODS["loss"]})
