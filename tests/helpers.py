"""Helpers the test files share: the CLI run in this process, and the one-line error every user mistake gets."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

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
