"""What every build engine shares: the views' units, categories from a file, input fingerprints, timed steps."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from urbanprofile.data.build.spec import BuildReport
from urbanprofile.data.io import load_json
from urbanprofile.errors import DataError

UNITS = {
    "poi_counts": "POIs per region and category",
    "landuse_counts": "share of the region's area (0-1) per land-use class",
    "od_flows": "trips from origin region (row) to destination region (column)",
    "od_patterns": "trips per time-of-day pattern (equal bins of the day), origin x destination",
}


def load_categories(value: list[str] | dict[str, list[str]] | str | None) -> list[str] | dict[str, list[str]] | None:
    """Categories from a list, a mapping, or a JSON file holding either."""
    if value is None or isinstance(value, list | dict):
        return value
    path = Path(value)
    loaded = load_json(path)
    if isinstance(loaded, list) and all(isinstance(v, str) for v in loaded):
        return loaded
    if isinstance(loaded, dict) and all(isinstance(v, list) for v in loaded.values()):
        return {str(k): [str(x) for x in v] for k, v in loaded.items()}
    raise DataError(f"{path}: categories must be a JSON list of names or an object {{category: [raw values]}}")


def source_of(path: Path | str) -> dict[str, Any]:
    """A file's path, size and SHA-256 (or the value itself when it is not a file), for the manifest."""
    file = Path(path)
    if not file.is_file():
        return {"value": str(path)}
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"path": str(file.resolve()), "bytes": file.stat().st_size, "sha256": digest.hexdigest()}


class Steps:
    """Times each step and, when asked, shows a rich progress bar on stderr."""

    def __init__(self, total: int, show: bool, report: BuildReport, log: Callable[[str], None] | None = None) -> None:
        self.report = report
        self.log_to = log
        self.progress: Any = None
        if show:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self.progress.start()
            self.task = self.progress.add_task("building", total=total)

    @contextmanager
    def step(self, name: str, description: str) -> Iterator[None]:
        if self.progress is not None:
            self.progress.update(self.task, description=description)
        start = time.perf_counter()
        yield
        self.report.seconds[name] = round(time.perf_counter() - start, 3)
        if self.progress is not None:
            self.progress.advance(self.task)

    def log(self, line: str) -> None:
        """A line for the user, printed above the progress bar (or to ``log``)."""
        if self.progress is not None:
            self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        elif self.log_to is not None:
            self.log_to(line)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
