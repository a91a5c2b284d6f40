"""Problems found by auditing issue 18 case by case from the command line, each pinned by a test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_hafusion_city
from helpers import run_cli_argv as cli


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


@pytest.mark.parametrize(("argv", "repeated"), [
    (["benchmark", "--datasets", "hafusion-testcity", "--datasets", "other", "--methods", "raw-poi"], "--datasets"),
    (["evaluate", "hafusion-testcity", "--method", "raw-poi", "--task", "crime", "--seeds=0", "--seeds=1"], "--seeds"),
    (["datasets", "info", "hafusion-testcity", "--data-dir", "a", "--data-dir", "b"], "--data-dir"),
    (["embed", "hafusion-testcity", "--method", "raw-poi", "-o", "a.parquet", "--out", "b.parquet"], "--out"),
])
def test_an_option_given_twice_is_refused_not_overridden(argv: list[str], repeated: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """click keeps the last of a repeated single-value option silently: ``--datasets a --datasets b`` ran b alone."""
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = cli(argv, capsys, monkeypatch, tmp_path)
    assert code == 2 and stderr.startswith("error: ") and len(stderr.splitlines()) == 1, stderr
    assert f"{repeated} is given more than once" in stderr
    assert not stdout and list(tmp_path.iterdir()) == []  # nothing ran, nothing written


def test_repeatable_options_and_values_that_look_like_options_are_not_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    write_hafusion_city(root, n=30)
    monkeypatch.chdir(tmp_path)
    code, _, stderr = cli(["map", "hafusion-testcity", "-l", "label:crime", "-o", "a.png", "-o", "b.html"], capsys,
                          monkeypatch, root)
    assert code == 0 and (tmp_path / "a.png").is_file() and (tmp_path / "b.html").is_file(), stderr
    code, _, stderr = cli(["evaluate", "hafusion-testcity", "--method", "raw-poi", "--task", "crime", "--seeds", "-1"],
                          capsys, monkeypatch, root)
    assert code == 2 and "more than once" not in stderr and "--seeds must be" in stderr


def test_progress_bar_at_80_columns_cuts_the_label_never_the_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long unit label (a dataset given by path) squeezed the elapsed and left times to ``0:0…``."""
    import io

    from rich.console import Console

    from urbanprofile.benchmark.runner import UnitProgress
    from urbanprofile.benchmark.unit import Unit
    from urbanprofile.methods import get_method

    folder = "/tmp/a/rather/long/path/to/a/built/dataset/folder"
    units = [Unit(folder, get_method("autoencoder"), seed, (("crime", "paper", "ridge"),)) for seed in (0, 1)]
    screen = io.StringIO()
    console = Console(file=screen, width=80, force_terminal=True, color_system=None)
    monkeypatch.setattr("rich.console.Console", lambda **_: console)
    with UnitProgress("serial", units) as shown:
        assert shown.live
        shown.epoch(units[1], 3, 10)
        shown.unit_done(units[0], [{"status": "ok"}])
        table = shown._bar.make_tasks_table(shown._bar.tasks)
    plain = io.StringIO()
    Console(file=plain, width=80, color_system=None).print(table)
    lines = [line for line in plain.getvalue().splitlines() if line.strip()]
    assert lines and all(len(line) <= 80 for line in lines)
    for line in lines:  # the unit line, then the epoch line of the unit in training
        assert len(line) <= 80 and line.rstrip().endswith(("left -:--:--", "left 0:00:00")), line
        assert "…" not in line.split("━")[-1]  # counts and times whole; only the label may be cut
    assert len(lines) == 2 and lines[0].startswith("units (serial), last: /tmp/") and " 1/2 " in lines[0]
    assert " 3/10 " in lines[1]
