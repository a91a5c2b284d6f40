"""Faults while a grid runs: Ctrl-C (benchmark and evaluate), a worker that dies while the pool starts or while it
runs a unit. Each leaves the store as before the command or with only whole finished units added."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import write_hafusion_city
from helpers import run_cli_argv as cli
from helpers import whole_units

from urbanprofile.benchmark import executors
from urbanprofile.benchmark.executors import ProcessExecutor
from urbanprofile.benchmark.runner import BenchmarkPlan, run_benchmark
from urbanprofile.benchmark.store import ResultStore
from urbanprofile.data import CityData, make_synthetic_city
from urbanprofile.methods import MethodSpec, get_method, register_method


@pytest.fixture
def hafusion_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_hafusion_city(root, n=30)
    return root


class InterruptedEmbedder:
    """Embeds like raw-poi; the seed named by the ``UP_TEST_INTERRUPT_SEED`` variable is hit by Ctrl-C."""

    def __init__(self, random_state: int | None = None) -> None:
        self.random_state = random_state

    def fit_transform(self, city: CityData) -> pd.DataFrame:
        if str(self.random_state) == os.environ.get("UP_TEST_INTERRUPT_SEED"):
            raise KeyboardInterrupt
        return get_method("raw-poi").build(random_state=self.random_state).fit_transform(city)


def _interrupted_method() -> MethodSpec:
    return register_method(MethodSpec("interrupted", f"{__name__}:InterruptedEmbedder", stochastic=True),
                           replace=True)


@pytest.mark.parametrize("command", ["benchmark", "evaluate"])
def test_ctrl_c_exits_130_and_keeps_whole_units(command: str, hafusion_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _interrupted_method()
    monkeypatch.setenv("UP_TEST_INTERRUPT_SEED", "2")
    path = tmp_path / "r.duckdb"
    if command == "benchmark":
        argv = ["benchmark", "--datasets", "hafusion-testcity", "--methods", spec.name, "--tasks", "crime,checkin",
                "--protocols", "paper", "--seeds", "0,1,2,3", "--store", str(path)]
    else:
        argv = ["evaluate", "hafusion-testcity", "--method", spec.name, "--task", "all", "--protocol", "paper",
                "--seeds", "0,1,2,3", "--store", str(path)]
    code, stdout, stderr = cli(argv, capsys, monkeypatch, hafusion_dir)
    assert code == 130, stderr
    assert "Traceback" not in stderr and "error:" not in stderr and stdout == ""
    [line] = [x for x in stderr.splitlines() if x.startswith("interrupted:")]
    assert "kept 2 finished units" in line and str(path) in line and "resume" in line
    with ResultStore(path) as store:
        rows = store.rows()
    cells = 2 if command == "benchmark" else 3  # evaluate --task all: every task of the city
    assert set(whole_units(rows, cells)) == {("hafusion-testcity", spec.name, 0), ("hafusion-testcity", spec.name, 1)}
    # The same command resumes: the kept seeds are reused, the rest computed.
    monkeypatch.delenv("UP_TEST_INTERRUPT_SEED")
    code, _, stderr = cli(argv + (["--json"] if command == "benchmark" else []), capsys, monkeypatch, hafusion_dir)
    assert code == 0, stderr
    with ResultStore(path) as store:
        assert len(whole_units(store.rows(), cells)) == 4


def test_ctrl_c_without_a_store_says_nothing_was_kept(hafusion_dir: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _interrupted_method()
    monkeypatch.setenv("UP_TEST_INTERRUPT_SEED", "0")
    code, _, stderr = cli(["evaluate", "hafusion-testcity", "--method", spec.name, "--task", "crime", "--seeds",
                           "0,1"], capsys, monkeypatch, hafusion_dir)
    assert code == 130 and "Traceback" not in stderr
    assert "interrupted: nothing kept (0 of 2 units had finished; give --store to keep them)" in stderr


def test_ctrl_c_on_a_new_store_leaves_no_file(hafusion_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _interrupted_method()
    monkeypatch.setenv("UP_TEST_INTERRUPT_SEED", "0")
    path = tmp_path / "r.duckdb"
    code, _, stderr = cli(["benchmark", "--datasets", "hafusion-testcity", "--methods", spec.name, "--tasks", "crime",
                           "--protocols", "paper", "--seeds", "0", "--store", str(path)], capsys, monkeypatch,
                          hafusion_dir)
    assert code == 130 and "kept 0 finished units" in stderr
    assert not path.exists()  # exactly as before the command


def test_sigint_to_a_running_benchmark(hafusion_dir: Path, tmp_path: Path) -> None:
    """A real SIGINT to the CLI process after its first unit: exit code 130 (not 0), one line, whole units."""
    path = tmp_path / "r.duckdb"
    env = {**os.environ, "URBANPROFILE_DATA": str(hafusion_dir), "OMP_NUM_THREADS": "1"}
    seeds = ",".join(map(str, range(40)))
    process = subprocess.Popen(
        [sys.executable, "-m", "urbanprofile.cli", "benchmark", "--datasets", "hafusion-testcity", "--methods",
         "autoencoder", "--tasks", "crime", "--protocols", "paper", "--seeds", seeds, "--store", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    assert process.stderr is not None
    watchdog = threading.Timer(240, process.kill)  # never hang the suite if the run stops printing
    watchdog.start()
    try:
        for line in process.stderr:
            lines.append(line)
            if line.startswith("unit 1/40 done"):  # one line per finished unit, as in a log
                process.send_signal(signal.SIGINT)
                break
        _, rest = process.communicate(timeout=120)
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
    stderr = "".join(lines) + rest
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    [line] = [x for x in stderr.splitlines() if x.startswith("interrupted:")]
    with ResultStore(path) as store:
        units = whole_units(store.rows(), 1)
    assert 1 <= len(units) < 40 and f"kept {len(units)} finished units" in line


# -- a worker that dies -----------------------------------------------------------------------------------------
class BreaksOnSubmit(ProcessPoolExecutor):
    """The first pool breaks after its first submission, as when a worker dies while the pool starts."""

    pools = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        type(self).pools += 1
        self._submitted = 0

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        self._submitted += 1
        if type(self).pools == 1 and self._submitted > 1:
            raise BrokenProcessPool("A child process terminated abruptly, the process pool is not usable anymore")
        return super().submit(*args, **kwargs)


class DiesOnceEmbedder:
    """Kills its worker process the first time (a marker file says it did), then embeds like raw-poi."""

    def __init__(self, random_state: int | None = None) -> None:
        self.random_state = random_state

    def fit_transform(self, city: CityData) -> pd.DataFrame:
        marker = Path(os.environ["UP_TEST_DIE_MARKER"])
        # Seed 0 is the one unit the first pool takes before it breaks at submit: its death hits that same pool,
        # so one fresh pool (not two) finishes everything and the test spawns fewer workers.
        if self.random_state == 0 and multiprocessing.parent_process() is not None and not marker.exists():
            marker.touch()
            os._exit(9)  # like a worker killed by the OOM killer
        return get_method("raw-poi").build(random_state=self.random_state).fit_transform(city)


def test_broken_pool_at_submit_and_a_killed_worker_keep_every_unit(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    city = make_synthetic_city(n_regions=40, n_poi_categories=8, random_state=1)
    spec = register_method(MethodSpec("dies-once", f"{__name__}:DiesOnceEmbedder", stochastic=True), replace=True)
    monkeypatch.setenv("UP_TEST_DIE_MARKER", str(tmp_path / "died"))
    monkeypatch.setattr(executors, "ProcessPoolExecutor", BreaksOnSubmit)
    monkeypatch.setattr(BreaksOnSubmit, "pools", 0)
    plan = BenchmarkPlan(datasets=["synthetic"], methods=[spec.name], tasks=["crime"], protocols=["paper"],
                         seeds=[0, 1, 2])
    serial = run_benchmark(plan, progress=False, cities={"synthetic": city})
    path = tmp_path / "r.duckdb"
    with ResultStore(path) as store:
        outcome = run_benchmark(plan, store=store, progress=False, cities={"synthetic": city},
                                executor=ProcessExecutor(jobs=2, retries=2))
        rows = store.rows()
    assert BreaksOnSubmit.pools >= 2 and (tmp_path / "died").exists()
    assert not outcome.failed and Counter(r["seed"] for r in rows) == {0: 1, 1: 1, 2: 1}
    key = lambda r: (r["seed"], r["r2"])  # noqa: E731
    assert sorted(map(key, rows)) == sorted(map(key, serial.rows))
