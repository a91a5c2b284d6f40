"""Executors: serial, local processes and Ray give identical rows; lost workers are retried; bad input is one line."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from helpers import assert_user_error
from helpers import run_cli_process as run_cli

from urbanprofile.benchmark.executors import ProcessExecutor, RayExecutor, SerialExecutor, make_executor
from urbanprofile.benchmark.runner import BenchmarkPlan, run_benchmark
from urbanprofile.benchmark.store import ResultStore
from urbanprofile.data import CityData, make_synthetic_city
from urbanprofile.errors import MissingDependencyError, UrbanProfileError
from urbanprofile.methods import MethodSpec, get_method, register_method

# Timings and the time stamp differ between runs; everything else must be identical.
_VARYING = {"created_at", "embed_seconds", "head_seconds", "fit_seconds"}


def _tiny_autoencoder(epochs: int = 40) -> MethodSpec:
    spec = dataclasses.replace(get_method("autoencoder"), name=f"autoencoder-{epochs}",
                               params={"n_components": 8, "epochs": epochs})
    return register_method(spec, replace=True)


def _comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = [{k: v for k, v in r.items() if k not in _VARYING} for r in rows]
    return sorted(out, key=lambda r: (r["method"], r["task"], r["protocol"], r["seed"]))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """One torch thread in this process too, as in the workers (and no oversubscription on a shared CI box)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def grid() -> tuple[dict[str, CityData], BenchmarkPlan]:
    city = make_synthetic_city(n_regions=48, n_poi_categories=8, random_state=1)
    plan = BenchmarkPlan(datasets=["synthetic"], methods=["raw-poi", _tiny_autoencoder().name], tasks=["crime"],
                         protocols=["paper", "nested"], seeds=[0, 1])
    return {"synthetic": city}, plan


@pytest.fixture(scope="module")
def serial_rows(grid: tuple[dict[str, CityData], BenchmarkPlan]) -> list[dict[str, Any]]:
    cities, plan = grid
    outcome = run_benchmark(plan, progress=False, cities=cities)
    assert len(outcome.rows) == 2 + 2 * 2 and not outcome.failed
    return _comparable(outcome.rows)


def test_processes_and_local_ray_give_the_serial_rows(
    grid: tuple[dict[str, CityData], BenchmarkPlan], serial_rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    pytest.importorskip("ray")
    cities, plan = grid
    with ResultStore(tmp_path / "jobs.duckdb") as store:
        jobs = run_benchmark(plan, store=store, progress=False, cities=cities, executor=ProcessExecutor(jobs=2))
        assert _comparable(store.rows()) == serial_rows  # what the driver wrote, unit by unit
    assert _comparable(jobs.rows) == serial_rows
    local_ray = run_benchmark(plan, progress=False, cities=cities, executor=RayExecutor(num_cpus=2))
    assert _comparable(local_ray.rows) == serial_rows


def _ray_unit_pids(parents: set[int]) -> list[int]:
    """Worker processes of the given raylets that are running a unit now (Ray retitles them ``ray::_ray_unit``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if cmdline.startswith(b"ray::_ray_unit") and ppid in parents:
            pids.append(int(entry.name))
    return pids


def test_two_node_cluster_keeps_every_row_when_a_worker_dies(
    grid: tuple[dict[str, CityData], BenchmarkPlan], tmp_path: Path
) -> None:
    """A head and a worker node on this machine (Ray's cluster utilities; both on this machine's address: with
    127.0.0.1 the utilities advertise the head at the machine's address and the worker node cannot join); a
    worker process of the worker node is killed while it runs a unit."""
    pytest.importorskip("ray")
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    cities, _ = grid
    spec = _tiny_autoencoder(epochs=200)  # long enough units to catch one running
    plan = BenchmarkPlan(datasets=["synthetic"], methods=[spec.name], tasks=["crime"], protocols=["paper"],
                         seeds=[0, 1, 2])
    expected = _comparable(run_benchmark(plan, progress=False, cities=cities).rows)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "temp_dir": tempfile.mkdtemp(prefix="up-ray-", dir="/tmp")})
    try:
        worker_node = cluster.add_node(num_cpus=1)
        raylets = {p.process.pid for p in worker_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET]}
        killed: list[int] = []
        finished = threading.Event()

        def kill_one_running_unit() -> None:
            while not finished.is_set() and not killed:
                for pid in _ray_unit_pids(raylets):
                    os.kill(pid, signal.SIGKILL)  # a Ray worker process this test's cluster started
                    killed.append(pid)
                    break
                time.sleep(0.02)

        watcher = threading.Thread(target=kill_one_running_unit, daemon=True)
        watcher.start()
        with ResultStore(tmp_path / "cluster.duckdb") as store:
            try:
                outcome = run_benchmark(plan, store=store, progress=False, cities=cities,
                                        executor=RayExecutor(address=cluster.address, retries=2))
            finally:
                finished.set()
                watcher.join()
            stored = store.rows()
    finally:
        cluster.shutdown()
    assert killed, "no unit was caught running on the worker node"
    assert not outcome.failed
    assert _comparable(outcome.rows) == expected
    assert _comparable(stored) == expected


# -- retries and failed rows ------------------------------------------------------------------------------
class LostWorkerEmbedder:
    """Dies like a lost worker inside a worker process; raises an unexpected error in the driver's process."""

    def __init__(self, random_state: int | None = None) -> None:
        self.random_state = random_state

    def fit_transform(self, city: CityData) -> pd.DataFrame:
        if multiprocessing.parent_process() is not None:
            os._exit(3)
        raise RuntimeError("simulated crash\nsecond line")


def test_units_that_keep_failing_become_failed_rows(grid: tuple[dict[str, CityData], BenchmarkPlan],
                                                    tmp_path: Path) -> None:
    cities, _ = grid
    spec = register_method(MethodSpec("lost-worker", f"{__name__}:LostWorkerEmbedder"), replace=True)
    plan = BenchmarkPlan(datasets=["synthetic"], methods=["raw-poi", spec.name], tasks=["crime"],
                         protocols=["nested"], seeds=[0])
    with ResultStore(tmp_path / "f.duckdb") as store:
        serial = run_benchmark(plan, store=store, progress=False, cities=cities, executor=SerialExecutor(retries=1))
        [failed] = serial.failed
        assert failed["method"] == "lost-worker" and failed["error"] == "RuntimeError: simulated crash"
        assert {r["method"]: r["status"] for r in store.rows()} == {"raw-poi": "ok", "lost-worker": "failed"}
        # A re-run retries the failed row only (here in worker processes that die: the pool is rebuilt).
        again = run_benchmark(plan, store=store, progress=False, cities=cities, executor=ProcessExecutor(2, retries=1))
        assert again.n_resumed == 1 and [r["method"] for r in again.failed] == ["lost-worker"]
        assert "BrokenProcessPool" in again.failed[0]["error"] and len(again.recomputed) == 1


def test_executor_bad_input(monkeypatch: pytest.MonkeyPatch, make_data_dir: Any) -> None:
    with pytest.raises(UrbanProfileError, match="--jobs must be at least 1"):
        make_executor("processes", jobs=0)
    with pytest.raises(UrbanProfileError, match="--address needs --executor ray"):
        make_executor("serial", address="auto")
    with pytest.raises(UrbanProfileError, match="unknown executor 'dask'"):
        make_executor("dask")
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'urbanprofile\[ray\]'"):
        make_executor("ray")
    data = make_data_dir()
    result = run_cli("benchmark", "--datasets", "hafusion-testcity", "--methods", "raw-poi", "--tasks", "crime",
                     "--executor", "ray", "--address", "127.0.0.1:9", "--store", str(data / "r.duckdb"),
                     data_dir=data)
    assert_user_error(result, "cannot reach a Ray cluster at 127.0.0.1:9", "ray start --head")
