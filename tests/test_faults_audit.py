"""Problems found by auditing issue 18 case by case from the command line, each pinned by a test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_hafusion_city
from test_faults_store import cli


def test_our_numeric_warning_is_one_line_without_source(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Huge but finite features: the row is ok and the user gets one ``warning:`` line, not Python's
    ``file.py:89: RuntimeWarning`` header followed by a line of our source code."""
    root = tmp_path / "data"
    folder = write_hafusion_city(root, n=30)
    np.save(folder / "poi_dist.npy", np.full((30, 26), 1e300))
    code, _, stderr = cli(["evaluate", "hafusion-testcity", "--method", "raw-poi", "--task", "crime",
                           "--protocol", "paper", "--seeds", "0"], capsys, monkeypatch, root)
    assert code == 0, stderr
    warned = [line for line in stderr.splitlines() if "numeric warnings" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: hafusion-testcity raw-poi seed 0: "), stderr
    assert "RuntimeWarning" not in stderr and ".py:" not in stderr and "run_unit(" not in stderr
