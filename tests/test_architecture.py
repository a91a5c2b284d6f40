"""The layers are checked, not hoped for: the light packages import no torch, and import-linter's contracts hold."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_data_evaluation_benchmark_and_report_import_no_torch() -> None:
    # Listing datasets, reading a store or writing a report must not pay for torch (seconds of import time).
    code = ("import sys, urbanprofile.data, urbanprofile.evaluation, urbanprofile.benchmark.store, "
            "urbanprofile.benchmark.runner, urbanprofile.report.html, urbanprofile.methods, urbanprofile.cli; "
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "print(','.join(heavy)); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"imported at module level: {result.stdout.strip()} {result.stderr[-500:]}"


def test_import_contracts_are_kept() -> None:
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint_imports is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    result = subprocess.run([lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
