"""The command line on a tiny configuration: exit code, printed table, written JSON and PNGs."""
import json

from influence_lib.benchmark.__main__ import main


def test_cli_runs_a_tiny_benchmark(tmp_path, capsys):
    out = tmp_path / "out"
    code = main([
        "--dataset", "digits", "--noise", "0.1", "--methods", "loss,random,first_order_exact", "--seeds", "2",
        "--epochs", "2", "--hidden", "16", "--n-train", "120", "--n-test", "40", "--out", str(out), "--quiet",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("loss", "random", "first_order_exact", "ROC-AUC"):
        assert name in printed
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["methods"]) == {"loss", "random", "first_order_exact"}
    assert len(saved["methods"]["loss"]["runs"]) == 2
    assert saved["config"]["nb_train"] == 120 and saved["config"]["mislabeling_ratio"] == 0.1
    assert len(saved["methods"]["loss"]["mean_curve_fraction_found"]) == 121
    assert saved["methods"]["loss"]["mean_curve_fraction_inspected"][-1] == 1.0
    assert (out / "detection_curves.png").stat().st_size > 0
    assert (out / "self_influence_histogram.png").stat().st_size > 0


def test_cli_reports_bad_arguments(capsys):
    assert main(["--methods", "nope", "--seeds", "1"]) == 2
    assert "Unknown or no method" in capsys.readouterr().err
    assert main(["--dataset", "mnist-3d", "--methods", "loss"]) == 2
    assert "Unknown dataset" in capsys.readouterr().err


def test_cli_lists_methods(capsys):
    assert main(["--list-methods"]) == 0
    assert "first_order_exact" in capsys.readouterr().out.split()
