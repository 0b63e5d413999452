"""The benchmark command line rejects bad arguments and unusable outputs before any training (exit code 2,
the flag named), and runs a tiny LDS benchmark end to end."""
import json

import pytest

import influence_lib.benchmark.__main__ as mislabel_cli
import influence_lib.benchmark.lds_cli as lds_cli
from influence_lib.benchmark.__main__ import main


@pytest.fixture
def no_training(monkeypatch):
    def forbidden(arguments):
        raise AssertionError("the benchmark ran although its arguments are invalid")

    monkeypatch.setattr(mislabel_cli, "run", forbidden)
    monkeypatch.setattr(lds_cli, "run", forbidden)


@pytest.mark.parametrize("arguments, flag, words", [
    (["--batch-size", "0"], "--batch-size", "positive integer"),
    (["--epochs", "-1"], "--epochs", "positive integer"),
    (["--epochs", "2.5"], "--epochs", "positive integer"),
    (["--seeds", "0"], "--seeds", "positive integer"),
    (["--first-seed", "-2"], "--first-seed", "integer ≥ 0"),
    (["--n-train", "zero"], "--n-train", "positive integer"),
    (["--hidden", "abc"], "--hidden", "comma-separated positive integers"),
    (["--hidden", "64,0"], "--hidden", "comma-separated positive integers"),
    (["--noise", "1.5"], "--noise", "between 0 and 1"),
    (["--noise", "nan"], "--noise", "finite"),
])
def test_mislabel_cli_rejects_bad_values_naming_the_flag(arguments, flag, words, capsys, no_training):
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert f"argument {flag}" in error and words in error


def test_unusable_out_fails_before_training(tmp_path, capsys, no_training):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert main(["--methods", "loss", "--out", str(blocker / "out")]) == 2
    assert "argument --out: cannot write" in capsys.readouterr().err
    assert main(["lds", "--methods", "random", "--out", str(blocker)]) == 2
    assert "argument --out: cannot write" in capsys.readouterr().err
    assert main(["lds", "--methods", "random", "--out", str(tmp_path / "ok"), "--store", str(blocker)]) == 2
    assert "argument --store: cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, words", [
    (["--subsets", "0"], "argument --subsets"),
    (["--alpha", "1"], "argument --alpha"),
    (["--train-size", "-5"], "argument --train-size"),
    (["--loo", "-1"], "argument --loo"),
    (["--model", "cnn"], "argument --model"),
    (["--sweep", "1e-3,abc"], "argument --sweep"),
    (["--momentum", "1.5"], "argument --momentum"),
    (["--set", "damping"], "field=value"),
    (["--set", "projection_dim=8", "--methods", "first_order_cg"], "No chosen method has a field 'projection_dim'"),
    (["--methods", "loss"], "cannot attribute"),
    (["--model", "logreg", "--hidden", "10"], "--hidden applies to --model mlp"),
])
def test_lds_cli_rejects_bad_arguments(arguments, words, tmp_path, capsys, no_training):
    assert main(["lds", "--out", str(tmp_path / "out"), *arguments]) == 2
    assert words in capsys.readouterr().err


def test_lds_cli_lists_methods_with_their_fields(capsys):
    assert main(["lds", "--list-methods"]) == 0
    printed = capsys.readouterr().out
    assert "first_order_cg: ihvp='cgd', damping=0.01" in printed and "loss:" not in printed


def test_mislabel_subcommand_is_the_default_form(capsys):
    assert main(["mislabel", "--list-methods"]) == 0
    assert "first_order_exact" in capsys.readouterr().out.split()


def test_lds_cli_runs_a_tiny_benchmark(tmp_path, capsys):
    out = tmp_path / "out"
    code = main([
        "lds", "--dataset", "digits", "--train-size", "100", "--test-size", "20", "--subsets", "5",
        "--no-noise-ceiling", "--methods", "first_order_exact,random", "--sweep", "0.01,1", "--epochs", "3",
        "--learning-rate", "0.1", "--out", str(out), "--quiet",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "first_order_exact[damping=0.01]" in printed and "LDS" in printed
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["methods"]) == {"first_order_exact[damping=0.01]", "first_order_exact[damping=1]", "random"}
    assert saved["config"]["setup"]["nb_subsets"] == 5 and saved["noise_ceiling"] is None
    assert "| random |" in (out / "results.md").read_text()
    assert (out / "lds.png").stat().st_size > 0
    assert (out / "ground_truth" / "subsets" / "manifest.json").exists()
