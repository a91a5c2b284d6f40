"""A new user's first hour: the README's commands run as written, and `make bench` leaves git clean."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _section(title: str, page: str = "README.md") -> str:
    text = (ROOT / page).read_text(encoding="utf-8")
    start = text.index(f"# {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def _shell_lines(section: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize(("title", "page"), [("Quickstart", "README.md"), ("Your own city", "README.md"),
                                             ("Bring your own city", "docs/own-city.md")])
def test_readme_commands_use_the_project_environment(title: str, page: str) -> None:
    lines = _shell_lines(_section(title, page))
    assert lines
    for line in lines:
        # a bare `python`, `pip` or `urbanprofile` is another environment's (or none): not what make installed
        assert not re.search(r"(^|[\s(])(python3?|pip|urbanprofile) ", line.replace("$(", "( ")), line
    assert "pip install 'urbanprofile[" not in _section(title, page)  # not on an index: install from the checkout


def test_readme_states_the_data_directory_rule_truthfully() -> None:
    text = _section("The two commands")
    assert "Under `make`" in text and "no default" in text


def test_make_bench_writes_where_git_ignores_it() -> None:
    make, git = shutil.which("make"), shutil.which("git")
    if make is None or git is None or not (ROOT / ".git").exists():
        pytest.skip("needs make and a git checkout")
    dry = subprocess.run([make, "-n", "-s", "bench"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    command = next(line for line in dry.stdout.splitlines() if "benchmarks/baselines.py" in line)
    out = command.split("--out", 1)[1].split()[0]
    assert not out.startswith("benchmarks/results")
    ignored = subprocess.run([git, "check-ignore", "-q", f"{out}/baselines_hafusion.md"], cwd=ROOT, timeout=60)
    assert ignored.returncode == 0, f"{out} is not ignored by git"
    refresh = subprocess.run([make, "-n", "-s", "bench", "BENCH_OUT=benchmarks/results"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert "--out benchmarks/results" in refresh.stdout  # the committed tables, only when asked


def test_the_main_job_runs_and_writes_its_tables(tmp_path: Path) -> None:
    """`make bench`'s script end to end on a small part (CityView location baselines, seed 0 only)."""
    import os
    import sys

    if not os.environ.get("URBANPROFILE_DATA"):
        pytest.skip("needs the benchmark data (URBANPROFILE_DATA)")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "baselines.py"), "--quick", "--parts",
                             "cityview", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "baselines_cityview.json").is_file() and (tmp_path / "baselines_cityview.md").is_file()
