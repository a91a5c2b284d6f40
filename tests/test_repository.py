"""The repository's own text files: no merge left half-done."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^(<{7} |>{7} |={7}$)", re.M)


def test_no_merge_conflict_markers() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    suffixes = {".py", ".md", ".toml", ".yml", ".yaml", ".cfg", ".txt", ".json"}
    found = [path for path in tracked if Path(path).suffix in suffixes
             and MARKER.search((ROOT / path).read_text(encoding="utf-8", errors="replace"))]
    assert not found, f"merge conflict markers in {found}"
