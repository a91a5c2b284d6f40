"""Threads: one thread per process by default, ``--threads N`` on every computing command, the same in worker
processes and Ray tasks, and the count recorded in every result row."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_user_error
from helpers import run_cli_process as run_cli

from urbanprofile import threads as threads_module
from urbanprofile.benchmark.executors import ProcessExecutor, SerialExecutor, _ray_unit, make_executor
from urbanprofile.benchmark.runner import BenchmarkPlan, plan_units, run_benchmark
from urbanprofile.benchmark.store import COLUMNS, ResultStore
from urbanprofile.data import CityData, make_synthetic_city
from urbanprofile.errors import UrbanProfileError
from urbanprofile.threads import THREAD_VARIABLES, apply_threads, current_threads, resolve_threads


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test leaves this process as it found it: torch's threads, the variables and the module's state."""
    for variable in THREAD_VARIABLES:  # monkeypatch restores each afterwards (apply_threads writes them)
        if variable in os.environ:
            monkeypatch.setenv(variable, os.environ[variable])
        else:
            monkeypatch.delenv(variable, raising=False)
    before = torch.get_num_threads()
    monkeypatch.setattr(threads_module, "_configured", None)
    monkeypatch.setattr(threads_module, "_limiter", None)
    yield
    torch.set_num_threads(before)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=before)


@pytest.fixture(scope="module")
def grid() -> tuple[dict[str, CityData], BenchmarkPlan]:
    city = make_synthetic_city(n_regions=40, n_poi_categories=8, random_state=0)
    plan = BenchmarkPlan(datasets=["synthetic"], methods=["raw-poi"], tasks=["crime"], protocols=["paper"],
                         seeds=[0])
    return {"synthetic": city}, plan


def test_one_thread_unless_asked() -> None:
    assert resolve_threads(None) == 1
    assert resolve_threads(3) == 3 and resolve_threads(0) == 0
    with pytest.raises(UrbanProfileError, match="--threads must be 0"):
        resolve_threads(-1)


def test_apply_threads_limits_torch_blas_and_later_processes() -> None:
    from threadpoolctl import threadpool_info

    assert apply_threads(2) == 2
    assert torch.get_num_threads() == 2 and current_threads() == 2
    assert all(os.environ[v] == "2" for v in THREAD_VARIABLES)  # inherited by workers started from now on
    pools = threadpool_info()
    assert pools and all(p["num_threads"] <= 2 for p in pools)  # BLAS and OpenMP loaded so far
    assert apply_threads(None) == 1
    assert torch.get_num_threads() == 1 and all(p["num_threads"] == 1 for p in threadpool_info())


def test_zero_keeps_the_library_defaults() -> None:
    torch.set_num_threads(2)
    variables = {v: os.environ.get(v) for v in THREAD_VARIABLES}
    assert apply_threads(0) == 2  # torch's own count, reported as is
    assert torch.get_num_threads() == 2 and {v: os.environ.get(v) for v in THREAD_VARIABLES} == variables


def test_rows_record_the_threads_of_the_process_that_computed_them(
    grid: tuple[dict[str, CityData], BenchmarkPlan], tmp_path: Path
) -> None:
    cities, plan = grid
    apply_threads(2)
    serial = run_benchmark(plan, progress=False, cities=cities, executor=SerialExecutor())
    assert [r["threads"] for r in serial.rows] == [2]
    # A worker process applies its own count (here 1, unlike this process's 2), and it reaches the store.
    with ResultStore(tmp_path / "store.duckdb") as store:
        jobs = run_benchmark(plan, store=store, progress=False, cities=cities,
                             executor=ProcessExecutor(jobs=1, threads=1))
        assert [r["threads"] for r in store.rows()] == [1]
    assert [r["threads"] for r in jobs.rows] == [1]


def test_ray_tasks_apply_the_thread_count(grid: tuple[dict[str, CityData], BenchmarkPlan]) -> None:
    cities, plan = grid
    units = plan_units(plan, cities=cities)[0]
    rows, _ = _ray_unit(units[0], cities["synthetic"], 3)  # what each Ray task runs, in this process
    assert [r["threads"] for r in rows] == [3] and torch.get_num_threads() == 3


def test_make_executor_passes_threads_to_workers() -> None:
    assert make_executor("processes", jobs=2, threads=3).threads == 3  # type: ignore[attr-defined]
    assert make_executor("processes", jobs=2).threads is None  # type: ignore[attr-defined]  # None: one each


def test_an_older_store_gains_the_new_columns(tmp_path: Path) -> None:
    import duckdb

    path = tmp_path / "old.duckdb"
    old = {k: v for k, v in COLUMNS.items() if k not in ("threads", "views")}
    con = duckdb.connect(str(path))
    con.execute(f"CREATE TABLE results ({', '.join(f'{k} {v}' for k, v in old.items())}, "
                "PRIMARY KEY (dataset, task, method, config_hash, protocol, seed, head))")
    con.execute("CREATE TABLE store_info (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute("INSERT INTO store_info VALUES ('schema_version', '3')")
    con.execute("INSERT INTO results (dataset, task, method, config_hash, protocol, seed, head, status, r2) "
                "VALUES ('d', 't', 'm', 'h', 'paper', 0, 'ridge', 'ok', 0.5)")
    con.close()
    with ResultStore(path, read_only=True) as store:  # read as it is
        assert [(r["r2"], r["threads"], r["views"]) for r in store.rows()] == [(0.5, None, None)]
    with ResultStore(path) as store:  # brought up to date for writing, keeping the old row
        store.put([{"dataset": "d", "task": "t", "method": "n", "config_hash": "h", "protocol": "paper", "seed": 0,
                    "head": "ridge", "status": "ok", "r2": 0.7, "threads": 1, "views": ["poi_counts"]}])
        rows = {r["method"]: (r["r2"], r["threads"], r["views"]) for r in store.rows()}
    assert rows == {"m": (0.5, None, None), "n": (0.7, 1, ["poi_counts"])}


@pytest.mark.parametrize("command", [
    ("embed", "hafusion-testcity", "--method", "raw-poi", "--out", "x.parquet"),
    ("evaluate", "hafusion-testcity", "--method", "raw-poi", "--task", "checkin"),
    ("benchmark", "--datasets", "hafusion-testcity", "--methods", "raw-poi"),
])
def test_negative_threads_is_one_line(command: tuple[str, ...], make_data_dir: Any, tmp_path: Path) -> None:
    data = make_data_dir()
    assert_user_error(run_cli(*command, "--threads", "-2", data_dir=data, cwd=tmp_path), "--threads", "-2")
    assert not (tmp_path / "x.parquet").exists()


def test_every_computing_command_takes_threads() -> None:
    from typer.testing import CliRunner

    from urbanprofile.cli import app

    for command in (["embed"], ["evaluate"], ["benchmark"], ["map"], ["r1", "train"], ["r1", "evaluate"]):
        result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and "--threads" in result.output, command


def test_evaluate_json_rows_carry_the_thread_count(make_data_dir: Any) -> None:
    result = run_cli("evaluate", "hafusion-testcity", "--method", "raw-poi", "--task", "checkin", "--protocol",
                     "paper", "--threads", "2", "--json", data_dir=make_data_dir())
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["threads"] for r in rows] == [2] and rows[0]["views"] == ["poi_counts"]
