"""Helpers the test files share: the CLI run in this process, and the one-line error every user mistake gets."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path
from typing import Any

import pytest


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str,
            width: int | None = None) -> tuple[int, str, str]:
    """Run ``urbanprofile ARGS`` in this process (faults can be simulated): (exit code, stdout, stderr).

    Args:
        width: A terminal width to render at (``None``: as the CLI chooses for a pipe).
    """
    from urbanprofile import cli, clikit

    monkeypatch.setattr(sys, "argv", ["urbanprofile", *args])
    if width is not None:
        # Every command module prints through these two consoles: their width is set in place.
        monkeypatch.setattr(clikit.out, "width", width)
        monkeypatch.setattr(clikit.err, "width", width)
        monkeypatch.setenv("COLUMNS", str(width))
    capsys.readouterr()
    code = 0
    try:
        cli.main()
    except SystemExit as stop:
        code = int(stop.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error(code: int, stderr: str, *fragments: str) -> str:
    """Exit code 2, no traceback, exactly one ``error:`` line holding every fragment; returns that line."""
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def run_cli_argv(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        data_dir: Path | None = None) -> tuple[int, str, str]:
    """Run ``urbanprofile`` in this process (faults can be simulated) and return (exit code, stdout, stderr)."""
    if data_dir is not None:
        monkeypatch.setenv("URBANPROFILE_DATA", str(data_dir))
    return run_cli(monkeypatch, capsys, *argv)


def whole_units(rows: list[dict[str, Any]], cells_per_unit: int) -> Counter[tuple[Any, ...]]:
    """Rows per (dataset, method, seed); asserts every unit in the store is whole."""
    units = Counter((r["dataset"], r["method"], r["seed"]) for r in rows)
    assert set(units.values()) <= {cells_per_unit}, units
    return units


def run_cli_process(*args: str, data_dir: Path | None = None,
                    cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``urbanprofile ARGS`` in a fresh Python process (what a user meets, start-up included)."""
    env = dict(os.environ)
    if data_dir is not None:
        env["URBANPROFILE_DATA"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "urbanprofile.cli", *args], capture_output=True, text=True, env=env, cwd=cwd,
        timeout=120,
    )


def assert_user_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """The process exited 2 with exactly one ``error:`` line holding every fragment, and no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


#: The documentation's worked examples (run by the tests, so the pages cannot drift from the code).
EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def load_example(name: str) -> types.ModuleType:
    """Import ``docs/examples/<name>.py`` as a module (registered in ``sys.modules``, so its factory resolves)."""
    spec = importlib.util.spec_from_file_location(f"docs_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
