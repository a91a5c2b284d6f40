"""What the benchmark scripts share: the environment, the basic arguments, and writing results atomically.

The scripts run as ``python benchmarks/<name>.py``, so this folder is on ``sys.path`` and they import it as
``common``. It uses only the public API of ``urbanprofile``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from urbanprofile import __version__
from urbanprofile.errors import UrbanProfileError

#: The committed tables (refreshed only on purpose).
RESULTS = Path(__file__).resolve().parent / "results"


def set_threads(threads: int = 1) -> None:
    """Pin torch's CPU threads, so that timings do not depend on how many cores the machine lends us.

    Args:
        threads: Intra-op threads (the scripts' default is 1; BLAS follows ``OMP_NUM_THREADS``, set by the
            caller before Python starts).
    """
    import torch

    torch.set_num_threads(threads)


def environment() -> dict[str, Any]:
    """What a result depends on besides its code: versions, machine and threads, stored beside every table."""
    import torch

    return {"package_version": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "machine": platform.machine(), "threads": torch.get_num_threads()}


def data_dir() -> Path | None:
    """The benchmark data (``$URBANPROFILE_DATA``), or ``None`` when it is not set to a folder."""
    value = os.environ.get("URBANPROFILE_DATA")
    return Path(value) if value and Path(value).is_dir() else None


def parser(doc: str | None, *, out: Path | None = None, seeds: str | None = None, parts: str | None = None,
           quick: str | None = None, raw_doc: bool = False, seeds_help: str = "comma-separated seeds",
           parts_help: str = "comma-separated parts") -> argparse.ArgumentParser:
    """An argument parser with the options the scripts share, each added only when its default is given.

    Args:
        doc: The script's docstring (its first line is the description unless ``raw_doc``).
        out: Default of ``--out``, the folder the results are written to.
        seeds: Default of ``--seeds`` (comma-separated; read it with :func:`parse_seeds`).
        parts: Default of ``--parts`` (comma-separated).
        quick: Help of ``--quick`` (what the smoke run leaves out).
        raw_doc: Show the whole docstring as the description, as written.
        seeds_help, parts_help: What ``--seeds`` and ``--parts`` mean in this script.
    """
    text = doc or ""
    result = argparse.ArgumentParser(
        description=text if raw_doc else (text.splitlines() or [""])[0],
        formatter_class=argparse.RawDescriptionHelpFormatter if raw_doc else argparse.HelpFormatter)
    if out is not None:
        result.add_argument("--out", type=Path, default=out, help=f"folder for the results (default {out})")
    if seeds is not None:
        result.add_argument("--seeds", default=seeds, help=f"{seeds_help} (default {seeds})")
    if parts is not None:
        result.add_argument("--parts", default=parts, help=f"{parts_help} (default {parts})")
    if quick is not None:
        result.add_argument("--quick", action="store_true", help=quick)
    return result


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` as ``[0, 1, 2]``; anything else is a one-line error."""
    items = [v.strip() for v in text.split(",")]
    if not items or not all(v.isdigit() for v in items):
        raise UrbanProfileError(f"--seeds must be comma-separated whole numbers, got {text!r}")
    return [int(v) for v in items]


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (floats to 3 decimals)."""
    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_text(path: Path, text: str) -> Path:
    """Write a file atomically: a reader (or an interrupted run) sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, payload: Any, *, default: Callable[[Any], Any] | None = None, indent: int = 1) -> Path:
    """Write ``payload`` as indented JSON, atomically (``default`` converts what json cannot)."""
    return write_text(path, json.dumps(payload, indent=indent, default=default))


def write_results(folder: Path, stem: str, payload: dict[str, Any], markdown: str, *,
                  default: Callable[[Any], Any] | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``folder``, each atomically.

    Returns:
        The two paths, JSON first.
    """
    return (write_json(folder / f"{stem}.json", payload, default=default),
            write_text(folder / f"{stem}.md", markdown))


def run(main: Callable[[], int | None]) -> None:
    """Run a script's ``main``: a user mistake is one ``error:`` line and exit code 2, not a traceback."""
    try:
        sys.exit(main() or 0)
    except UrbanProfileError as error:
        sys.stderr.write(f"error: {' '.join(str(error).split())}\n")
        sys.exit(2)
