"""What every command line of the project shares: the consoles, the common options, output checks and config files.

It sits below both the main CLI (``urbanprofile.cli``) and the applications' own command groups
(``urbanprofile.apps.r1.cli``), which the main CLI mounts: a shared module inside ``urbanprofile.cli`` would make
the applications import upward.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from urbanprofile.errors import UrbanProfileError
from urbanprofile.threads import apply_threads


def make_console(stderr: bool = False) -> Console:
    """A console that wraps to the terminal, or never cuts a table when output goes to a pipe or file.

    Markup is off: what we print carries user text (paths, names, error messages such as
    ``pip install 'urbanprofile[ray]'``) whose brackets rich would otherwise take for styles and drop.
    """
    console = Console(stderr=stderr, markup=False)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, width=100_000, markup=False)


out = make_console()
err = make_console(stderr=True)

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Data directory (default: $URBANPROFILE_DATA).", show_default=False),
]
Threads = Annotated[
    int | None,
    typer.Option("--threads", help="CPU threads per process for torch and BLAS (default 1, fastest for these sizes "
                 "on a busy machine; 0: the libraries' defaults).", show_default=False),
]


def set_threads(threads: int | None) -> int:
    """Apply ``--threads`` to torch and BLAS; returns the number of threads in use."""
    return apply_threads(threads)


def split_list(value: str | None) -> list[str] | None:
    """A comma-separated option as a list (blank items dropped); ``None`` when not given or blank."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


def opt(help_text: str) -> Any:
    """An option whose default is not shown (its help says what not giving it means)."""
    return typer.Option(help=help_text, show_default=False)


ConfigFile = Annotated[Path | None, typer.Option(
    "--config", help="TOML file whose keys are this command's settings; flags given override it.",
    show_default=False)]


def configured(schema: type[Any], path: Path | None, flags: dict[str, Any],
                flag_names: dict[str, str] | None = None) -> Any:
    """The command's config dataclass: the flags given, else the ``--config`` file's keys, else its defaults."""
    # Here, not at the top: tomllib and typing's introspection cost --help about 20 ms (python -X importtime).
    from urbanprofile.config import load_config, make_config

    file_values = load_config(path, schema) if path is not None else {}
    return make_config(schema, file_values, flags, source=path, flag_names=flag_names)


def fmt(value: Any, digits: int = 3) -> str:
    """A figure for a table: ``-`` for a missing value or NaN, floats with ``digits`` decimals."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if value != value else f"{value:.{digits}f}"
    return str(value)


# -- output paths ------------------------------------------------------------------------------------
Parents = Annotated[bool, typer.Option("--parents", help="Create the output's missing parent folders.")]


def check_output(path: Path, *, parents: bool, overwrite: bool | None = None, folder: bool = False) -> None:
    """Refuse an output location before any work is done: a missing parent folder (unless ``parents``), a
    file where a folder is wanted or the reverse, an existing file (when ``overwrite`` is False), or a
    place we may not write in. ``overwrite=None``: an existing file is replaced (regenerable figures)."""
    if folder and path.exists() and not path.is_dir():
        raise UrbanProfileError(f"{path}: exists and is not a folder")
    if not folder and path.is_dir():
        raise UrbanProfileError(f"{path}: is a folder; give a file name")
    if overwrite is False and path.exists():
        raise UrbanProfileError(f"{path}: already exists; pass --overwrite to replace it")
    parent = path if folder and path.is_dir() else path.parent
    if not parent.exists():
        if not parents:
            raise UrbanProfileError(f"{parent}: folder does not exist; create it or pass --parents")
        while not parent.exists():  # the folder that --parents would create its path in
            parent = parent.parent
    if not parent.is_dir():
        raise UrbanProfileError(f"{parent}: is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UrbanProfileError(f"{parent}: cannot write in this folder (permission denied)")


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failed write (full disk, read-only file system, permissions) into one ``error:`` line, and
    remove the folders this command created on the way to ``path`` (only those, and only if empty)."""
    created = []
    ancestor = path.parent
    while not ancestor.exists():
        created.append(ancestor)
        ancestor = ancestor.parent
    try:
        yield
    except BaseException as error:
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(error, OSError) and not isinstance(error, UrbanProfileError):
            raise UrbanProfileError(f"{path}: could not write ({error.strerror or error})") from None
        raise
