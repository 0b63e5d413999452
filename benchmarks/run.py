"""Side-by-side speed benchmark of influence_lib against Influenciae 0.3.0.

Usage (from the repository root, with the project's interpreter)::

    .venv/bin/python benchmarks/run.py [--quick] [--workloads exact,cg,tracin,tracin_all,arnoldi]
                                       [--peer-python PATH | --no-peer]

Each library runs in its own interpreter: influence_lib in this one, Influenciae 0.3.0 in a
virtual environment with TF 2.21 and legacy Keras 2 (``TF_USE_LEGACY_KERAS=1``). Without
``--peer-python`` (or ``$INFLUENCIAE_PYTHON``) that environment is created on first use in
``benchmark_results/influenciae-venv`` (pip downloads TensorFlow once, a few minutes).

Steps: write the settings, train the MLP 64-128-10 once on the influence_lib side and store the
weights in ``model.npz``, time every workload on each side (JSON lines), then print a table of
times and speed-up ratios and check that both libraries return the same numbers.
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCHMARK_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARK_DIR))
import workloads

REPO_ROOT = BENCHMARK_DIR.parent
DEFAULT_WORKDIR = REPO_ROOT / "benchmark_results" / "side_by_side"
DEFAULT_PEER_VENV = REPO_ROOT / "benchmark_results" / "influenciae-venv"
PEER_REQUIREMENTS = ["tensorflow-cpu==2.21.0", "tf-keras==2.21.0", "numpy"]
# Influenciae pins tensorflow<2.10 (no wheels for recent Pythons): it is installed without its pins.
PEER_PACKAGE = "influenciae==0.3.0"


def create_peer_env(venv: Path) -> Path:
    """Create a virtual environment with Influenciae 0.3.0 on TF 2.21 / tf-keras; return its python."""
    print(f"Creating the Influenciae 0.3.0 environment in {venv} (one-off, downloads TensorFlow)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + PEER_REQUIREMENTS, check=True)
    subprocess.run(pip + ["--no-deps", PEER_PACKAGE], check=True)
    return venv / "bin" / "python"


def resolve_peer_python(requested: str | None) -> Path:
    """The Influenciae interpreter: the option, else $INFLUENCIAE_PYTHON, else the default venv."""
    requested = requested or os.environ.get("INFLUENCIAE_PYTHON")
    if requested:
        path = Path(requested)
        if not path.exists():
            raise SystemExit(f"--peer-python {path} does not exist; create it with a venv holding influenciae==0.3.0.")
        return path
    python = DEFAULT_PEER_VENV / "bin" / "python"
    return python if python.exists() else create_peer_env(DEFAULT_PEER_VENV)


def run_side(command: list[str], log: Path, extra_env: dict[str, str]) -> list[dict]:
    """Run one side; return the JSON lines it printed (its stderr goes to ``log``)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **extra_env}
    env.pop("PYTHONPATH", None)
    with log.open("w") as stderr:
        completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=REPO_ROOT)
    results = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {completed.returncode}); see {log}.")
    return results


def per_sample(result: dict, key: str) -> float:
    return result[key] / result["n_values"]


def compare(workload: str, ours: dict, theirs: dict, workdir: Path) -> dict:
    """Speed-up ratios (Influenciae time / influence_lib time) and numerical agreement of one workload."""
    ours_values = np.load(workdir / f"influence_lib_{workload}.npy")
    theirs_values = np.load(workdir / f"influenciae_{workload}.npy")
    if workload == "cg":
        # Influenciae solves a subset (one right-hand side at a time): compare per-sample costs.
        ratio_cold = per_sample(theirs, "cold_seconds") / per_sample(ours, "cold_seconds")
        ratio_warm = per_sample(theirs, "warm_seconds") / per_sample(ours, "warm_seconds")
        ours_values = ours_values[: theirs_values.size]
    else:
        ratio_cold = theirs["cold_seconds"] / ours["cold_seconds"]
        ratio_warm = theirs["warm_seconds"] / ours["warm_seconds"]
    return {
        "workload": workload,
        "speedup_cold": ratio_cold,
        "speedup_warm": ratio_warm,
        **workloads.agreement(theirs_values, ours_values),
    }


NOTES = {
    "exact": "Hessian over the first {hessian} samples, pseudo-inverse on both sides",
    "cg": "per-sample ratio: Influenciae solves {subset} samples one at a time, influence_lib all {n}; "
    "{iterations} iterations",
    "tracin": "{checkpoints} checkpoints, same learning rate, last layer",
    "tracin_all": "{checkpoints} checkpoints, same learning rate, all layers (P = 9610)",
    "arnoldi": "timing only: Influenciae keeps the k smallest eigenvalues (a bug), so values differ",
}


def markdown_table(settings: workloads.Settings, rows: list[dict], results: dict) -> str:
    lines = [
        "| workload | samples (influence_lib / Influenciae) | influence_lib cold / warm (s) | "
        "Influenciae cold / warm (s) | speed-up cold / warm | Pearson | max diff / max | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours, theirs = results[("influence_lib", row["workload"])], results[("influenciae", row["workload"])]
        note = NOTES[row["workload"]].format(
            subset=theirs["n_values"],
            n=ours["n_values"],
            checkpoints=len(settings.checkpoint_epochs),
            hessian=settings.hessian_samples,
            iterations=settings.cg_max_iterations,
        )
        lines.append(
            f"| {row['workload']} | {ours['n_values']} / {theirs['n_values']} "
            f"| {ours['cold_seconds']:.2f} / {ours['warm_seconds']:.2f} "
            f"| {theirs['cold_seconds']:.2f} / {theirs['warm_seconds']:.2f} "
            f"| {row['speedup_cold']:.1f}× / {row['speedup_warm']:.1f}× "
            f"| {row['pearson']:.6f} | {row['max_diff_over_max']:.1e} | {note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke run of under a minute.")
    parser.add_argument("--workloads", default=",".join(workloads.WORKLOADS), help="Comma-separated subset.")
    parser.add_argument("--peer-python", default=None, help="Python of a venv with influenciae==0.3.0.")
    parser.add_argument("--no-peer", action="store_true", help="Time influence_lib only.")
    parser.add_argument(
        "--samples", type=int, default=None, help="Number of training samples scored (default 4096)."
    )
    parser.add_argument(
        "--hessian-samples", type=int, default=None, help="Average the Hessian over this many samples (default 1024)."
    )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="Where data and results go.")
    args = parser.parse_args(argv)
    try:
        names = workloads.parse_workloads(args.workloads)
    except ValueError as error:
        parser.error(str(error))
    settings = workloads.Settings.quick() if args.quick else workloads.Settings()
    if args.samples is not None:
        if args.samples < settings.hessian_samples:
            parser.error(f"--samples must be at least the number of Hessian samples ({settings.hessian_samples}).")
        settings = dataclasses.replace(settings, n_samples=args.samples)
    if args.hessian_samples is not None:
        if not 0 < args.hessian_samples <= settings.n_samples:
            parser.error(f"--hessian-samples must be in [1, {settings.n_samples}].")
        settings = dataclasses.replace(settings, hessian_samples=args.hessian_samples)
    args.workdir.mkdir(parents=True, exist_ok=True)
    settings.save(args.workdir / "settings.json")
    started = time.perf_counter()

    side_script = str(BENCHMARK_DIR / "influence_lib_side.py")
    workdir_args = ["--workdir", str(args.workdir)]
    run_side([sys.executable, side_script, "prepare", *workdir_args], args.workdir / "prepare.log", {})
    ours = run_side(
        [sys.executable, side_script, "run", *workdir_args, "--workloads", ",".join(names)],
        args.workdir / "influence_lib.log",
        {},
    )
    skipped = {result["workload"]: result["skipped"] for result in ours if "skipped" in result}
    measured = [name for name in names if name not in skipped]
    theirs = []
    if not args.no_peer and measured:
        peer_python = resolve_peer_python(args.peer_python)
        theirs = run_side(
            [str(peer_python), str(BENCHMARK_DIR / "influenciae_side.py"), *workdir_args,
             "--workloads", ",".join(measured)],
            args.workdir / "influenciae.log",
            {"TF_USE_LEGACY_KERAS": "1"},
        )
    errors = [result for result in ours + theirs if "error" in result]
    results = {
        (result["side"], result["workload"]): result
        for result in ours + theirs
        if "skipped" not in result and "error" not in result
    }

    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    for error in errors:
        print(f"FAILED {error['side']} {error['workload']}: {error['error']} (traceback-free summary; see the logs)")
    for name in measured:
        result = results.get(("influence_lib", name))
        if result is not None:
            print(
                f"influence_lib {name}: {result['n_values']} values, cold {result['cold_seconds']:.2f} s, "
                f"warm {result['warm_seconds']:.2f} s, all finite: {result['finite']}"
            )
    rows = [compare(name, results[("influence_lib", name)], results[("influenciae", name)], args.workdir)
            for name in measured if ("influence_lib", name) in results and ("influenciae", name) in results]
    if rows:
        print()
        print(markdown_table(settings, rows, results))
    summary = {
        "settings": json.loads((args.workdir / "settings.json").read_text()),
        "results": list(results.values()),
        "comparisons": rows,
        "skipped": skipped,
        "errors": errors,
        "total_seconds": time.perf_counter() - started,
    }
    (args.workdir / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"\nTotal {summary['total_seconds']:.0f} s; details in {args.workdir / 'results.json'}")
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
