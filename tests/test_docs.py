"""The documentation site builds with ``mkdocs build --strict`` (broken links, missing pages and
unresolvable API references are errors)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]')")

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert (tmp_path / "site" / "index.html").exists()
    reference = (tmp_path / "site" / "api" / "benchmark" / "index.html").read_text(encoding="utf-8")
    assert "MislabelingDetectorEvaluator" in reference  # API pages are generated from the docstrings
