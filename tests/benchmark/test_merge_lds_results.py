"""benchmarks/merge_lds_results.py: methods picked from several ``influence-benchmark lds`` runs into one table."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "merge_lds_results.py"


def _module():
    spec = importlib.util.spec_from_file_location("merge_lds_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(directory: Path, methods: dict, dataset: str = "fashion_mnist") -> str:
    directory.mkdir()
    config = {"dataset": dataset, "model": "mlp", "nb_train": 10, "nb_test": 4, "setup": {"nb_subsets": 5},
              "description": "tiny"}
    ceiling = {"run_to_run": {"mean": 0.25, "standard_error": 0.01, "nb_undefined": 0}, "ceiling": 0.5}
    (directory / "results.json").write_text(json.dumps({"config": config, "methods": methods, "noise_ceiling": ceiling}))
    return str(directory)


def _entry(mean, error=None):
    lds = None if error else {"mean": mean, "standard_error": 0.01, "nb_undefined": 0}
    return {"lds": lds, "loo": None, "seconds": 2.0, "error": error}


def test_methods_of_several_runs_are_merged_renamed_and_ordered(tmp_path):
    merge = _module().merge
    first = _run(tmp_path / "a", {"trak_ensemble": _entry(0.3)})
    second = _run(tmp_path / "b", {"trak_ensemble": _entry(0.2), "rps_lje": _entry(0.0, "ValueError: bias")})
    results, ceiling, _ = merge([f"{first}:trak_ensemble:TRAK-50", f"{second}:trak_ensemble:TRAK-10",
                                 f"{second}:rps_lje"])
    assert list(results) == ["TRAK-50", "TRAK-10", "rps_lje"]
    assert results["TRAK-50"].lds.mean == 0.3 and results["TRAK-10"].lds.mean == 0.2
    assert results["rps_lje"].lds is None and results["rps_lje"].error == "ValueError: bias"
    assert ceiling.ceiling == 0.5 and ceiling.run_to_run.mean == 0.25
    with pytest.raises(ValueError, match="no method 'tracin'"):
        merge([f"{first}:tracin"])
    other = _run(tmp_path / "c", {"random": _entry(0.0)}, dataset="digits")
    with pytest.raises(ValueError, match="another protocol"):
        merge([f"{first}:trak_ensemble", f"{other}:random"])
