"""Where benchmark units run: serially in this process, in local worker processes, or on a Ray cluster.

A unit is one fit of a method on a dataset with one seed and the probes it feeds
(:class:`urbanprofile.benchmark.unit.Unit`). Every executor yields ``(unit, rows, skipped)`` as units
finish, in whatever order they finish; the driver writes each unit's rows to the store in one transaction.
Workers never touch the store. The cities travel once to each worker (the process pool's initializer, Ray's
object store), units and rows are small.

A unit that raises is retried up to ``retries`` times (a lost worker, a crash); a user-level error (a
diverged training) is final at once. A unit that still fails becomes failed rows with the one-line reason.
"""

from __future__ import annotations

import abc
import logging
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from queue import Empty
from typing import TYPE_CHECKING, Any

from urbanprofile.benchmark.unit import Unit, failed_rows, one_line, run_unit
from urbanprofile.errors import UrbanProfileError, require, unknown_name
from urbanprofile.threads import apply_threads

if TYPE_CHECKING:
    from urbanprofile.data.city import CityData
    from urbanprofile.embedders.base import Embedder
    from urbanprofile.methods import MethodSpec

UnitResult = tuple[Unit, list[dict[str, Any]], list[str]]
EXECUTORS = ("serial", "processes", "ray")
#: Retries of a unit whose worker died or that raised an unexpected error.
DEFAULT_RETRIES = 2


class Executor(abc.ABC):
    """Runs units and yields each one's rows as it finishes."""

    name = "executor"

    @abc.abstractmethod
    def run(
        self,
        units: list[Unit],
        cities: dict[str, CityData],
        on_embedding: Callable[[CityData, MethodSpec, int, Embedder], None] | None = None,
        on_epoch: Callable[[Unit, int, int], None] | None = None,
    ) -> Iterator[UnitResult]:
        """Run ``units`` (their cities are in ``cities``) and yield ``(unit, rows, skipped)`` per unit.

        ``on_epoch(unit, epoch, total)`` follows the training of methods that report epochs, where the executor
        can see them (this process only)."""


def _set_threads(threads: int | None) -> None:
    apply_threads(threads)


class SerialExecutor(Executor):
    """Units one after the other in this process (the default)."""

    name = "serial"

    def __init__(self, retries: int = DEFAULT_RETRIES) -> None:
        self.retries = retries

    def run(
        self,
        units: list[Unit],
        cities: dict[str, CityData],
        on_embedding: Callable[[CityData, MethodSpec, int, Embedder], None] | None = None,
        on_epoch: Callable[[Unit, int, int], None] | None = None,
    ) -> Iterator[UnitResult]:
        for unit in units:
            for attempt in range(self.retries + 1):
                try:
                    rows, skipped = run_unit(unit, cities[unit.dataset], on_embedding, on_epoch)
                    break
                except Exception as err:  # retried, then reported as failed rows
                    if attempt == self.retries:
                        rows, skipped = failed_rows(unit, one_line(err)), []
            yield unit, rows, skipped


# -- local worker processes ---------------------------------------------------------------------------
_WORKER_CITIES: dict[str, CityData] = {}
#: Where a worker sends ``(unit, epoch, total)`` of the training it runs (``None``: nobody follows epochs).
_WORKER_EPOCHS: list[Any] = [None]
#: Seconds between two epochs a worker sends (the last epoch is always sent): a bar needs no more.
_EPOCH_INTERVAL = 0.2


def _init_worker(cities: dict[str, CityData], threads: int | None, epochs: Any = None) -> None:
    # Ctrl-C reaches the whole process group: the driver handles it (and stops the workers), a worker that also
    # raised would only print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_threads(threads)
    _WORKER_CITIES.update(cities)
    _WORKER_EPOCHS[0] = epochs


def _worker_unit(unit: Unit) -> tuple[list[dict[str, Any]], list[str]]:
    queue = _WORKER_EPOCHS[0]
    if queue is None:
        return run_unit(unit, _WORKER_CITIES[unit.dataset])
    sent = [0.0]

    def on_epoch(unit: Unit, epoch: int, total: int) -> None:
        now = time.monotonic()
        if epoch == total or now - sent[0] >= _EPOCH_INTERVAL:
            sent[0] = now
            queue.put((unit, epoch, total))

    return run_unit(unit, _WORKER_CITIES[unit.dataset], on_epoch=on_epoch)


def _drain(queue: Any, on_epoch: Callable[[Unit, int, int], None]) -> None:
    """Pass on the epochs the workers sent so far."""
    while True:
        try:
            on_epoch(*queue.get_nowait())
        except Empty:
            return


class ProcessExecutor(Executor):
    """Units in ``jobs`` local worker processes (``--jobs N``), for a user without Ray.

    Args:
        jobs: Worker processes.
        retries: Retries of a unit whose worker died or raised.
        threads: Threads per worker for torch and BLAS (``None``: one, which keeps ``jobs`` workers from
            oversubscribing; ``0``: the libraries' defaults).
    """

    name = "processes"

    def __init__(self, jobs: int = 2, retries: int = DEFAULT_RETRIES, threads: int | None = None) -> None:
        self.jobs = jobs
        self.retries = retries
        self.threads = threads

    def run(
        self,
        units: list[Unit],
        cities: dict[str, CityData],
        on_embedding: Callable[[CityData, MethodSpec, int, Embedder], None] | None = None,
        on_epoch: Callable[[Unit, int, int], None] | None = None,
    ) -> Iterator[UnitResult]:
        import multiprocessing

        if self.jobs < 1:
            raise UrbanProfileError(f"--jobs must be at least 1, got {self.jobs}")
        if not units:
            return
        needed = {u.dataset: cities[u.dataset] for u in units}
        attempts = {i: 0 for i in range(len(units))}
        todo = list(range(len(units)))
        context = multiprocessing.get_context("spawn")  # fork after torch or rich threads is unsafe
        # Workers get the queue at start (a multiprocessing queue travels only to a process being started).
        epochs = context.Queue() if on_epoch is not None else None
        try:
            yield from self._run(units, needed, attempts, todo, context, epochs, on_epoch)
        finally:
            if epochs is not None:
                epochs.close()
                epochs.cancel_join_thread()  # epochs nobody reads any more must not hold up the exit

    def _run(self, units: list[Unit], needed: dict[str, CityData], attempts: dict[int, int], todo: list[int],
             context: Any, epochs: Any, on_epoch: Callable[[Unit, int, int], None] | None) -> Iterator[UnitResult]:
        while todo:
            pool = ProcessPoolExecutor(max_workers=min(self.jobs, len(todo)), mp_context=context,
                                       initializer=_init_worker, initargs=(needed, self.threads, epochs))
            clean = False
            try:
                running: dict[Future[tuple[list[dict[str, Any]], list[str]]], int] = {}
                queued, todo = todo, []
                for n, i in enumerate(queued):
                    try:
                        running[pool.submit(_worker_unit, units[i])] = i
                    except BrokenProcessPool as err:  # a worker died while the pool was starting
                        for j in queued[n:]:
                            yield from self._lost(units, j, attempts, err, todo)
                        break
                while running:
                    finished, _ = wait(running, timeout=None if epochs is None else _EPOCH_INTERVAL,
                                       return_when=FIRST_COMPLETED)
                    if epochs is not None and on_epoch is not None:
                        _drain(epochs, on_epoch)
                    for future in finished:
                        i = running.pop(future)
                        try:
                            rows, skipped = future.result()
                        except BrokenProcessPool as err:
                            yield from self._lost(units, i, attempts, err, todo)
                            continue
                        except Exception as err:
                            attempts[i] += 1
                            if attempts[i] <= self.retries:
                                try:
                                    running[pool.submit(_worker_unit, units[i])] = i
                                except BrokenProcessPool:
                                    todo.append(i)  # the pool broke meanwhile: a fresh pool runs it
                                continue
                            rows, skipped = failed_rows(units[i], one_line(err)), []
                        yield units[i], rows, skipped
                clean = True
            finally:
                if not clean:  # Ctrl-C, or the driver stopped reading (a failed write): no waiting for workers
                    _stop_workers(pool)
                pool.shutdown(wait=True, cancel_futures=True)

    def _lost(self, units: list[Unit], i: int, attempts: dict[int, int], err: BaseException, todo: list[int]
              ) -> Iterator[UnitResult]:
        """A unit whose pool broke (a worker died): run again on a fresh pool, or failed rows past the retries."""
        attempts[i] += 1
        if attempts[i] <= self.retries:
            todo.append(i)
            return
        yield units[i], failed_rows(units[i], one_line(err)), []


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's worker processes (this run started them); shutdown() alone waits for running units."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        if process.is_alive():
            process.terminate()


# -- Ray -----------------------------------------------------------------------------------------------
def _ray_unit(unit: Unit, city: CityData, threads: int | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    _set_threads(threads)
    return run_unit(unit, city)


def check_ray_address(address: str, timeout: float = 3.0) -> None:
    """Fail fast, in one line, when ``HOST:PORT`` does not answer (Ray itself would wait a minute)."""
    host, _, port = address.rpartition(":")
    if address.startswith("ray://") or not host:
        return
    if not port.isdigit():
        raise UrbanProfileError(f"--address must be auto or HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UrbanProfileError(f"cannot reach a Ray cluster at {address} ({reason}); start one with "
                                "`ray start --head`, or leave out --address for a local Ray") from None


class RayExecutor(Executor):
    """One Ray task per unit on a cluster (``address``: ``auto``, ``HOST:PORT``) or a local Ray instance.

    Args:
        address: Cluster to join; ``None`` starts a local Ray instance for this run.
        retries: Ray's ``max_retries`` of a task (a dead worker or node, an unexpected exception).
        num_cpus: CPUs of the local instance (``None``: all).
        threads: Threads of each task for torch and BLAS (``None``: one; ``0``: the libraries' defaults).
    """

    name = "ray"

    def __init__(self, address: str | None = None, retries: int = DEFAULT_RETRIES, num_cpus: int | None = None,
                 threads: int | None = None) -> None:
        self.address = address
        self.threads = threads
        self.retries = retries
        self.num_cpus = num_cpus

    def _connect(self) -> Any:
        ray = require("ray", "ray")
        if self.address not in (None, "auto"):
            check_ray_address(str(self.address))
        try:
            if self.address is None:
                ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False,
                         logging_level=logging.ERROR, log_to_driver=False)
            else:
                ray.init(address=self.address, logging_level=logging.ERROR, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UrbanProfileError(f"cannot join the Ray cluster at {self.address}: {one_line(err)}") from None
        return ray

    def run(
        self,
        units: list[Unit],
        cities: dict[str, CityData],
        on_embedding: Callable[[CityData, MethodSpec, int, Embedder], None] | None = None,
        on_epoch: Callable[[Unit, int, int], None] | None = None,
    ) -> Iterator[UnitResult]:
        if not units:
            return
        ray = self._connect()
        pending: dict[Any, Unit] = {}
        try:
            task = ray.remote(num_cpus=1, max_retries=self.retries, retry_exceptions=True)(_ray_unit)
            refs = {name: ray.put(cities[name]) for name in {u.dataset for u in units}}
            pending = {task.remote(unit, refs[unit.dataset], self.threads): unit for unit in units}
            while pending:
                finished, _ = ray.wait(list(pending), num_returns=1)
                for ref in finished:
                    unit = pending.pop(ref)
                    try:
                        rows, skipped = ray.get(ref)
                    except ray.exceptions.RayError as err:
                        cause = getattr(err, "cause", None)
                        rows, skipped = failed_rows(unit, one_line(cause if cause is not None else err)), []
                    yield unit, rows, skipped
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            ray.shutdown()


def make_executor(kind: str = "serial", jobs: int | None = None, address: str | None = None,
                  retries: int = DEFAULT_RETRIES, threads: int | None = None) -> Executor:
    """The executor for ``--executor`` / ``--jobs`` / ``--address``.

    ``--jobs N`` alone means local worker processes; with ``--executor ray`` and no address it sizes the
    local Ray instance. ``threads`` is each worker's or task's thread count (``--threads``; the serial executor
    runs with this process's, see :mod:`urbanprofile.threads`).
    """
    if kind not in EXECUTORS:
        raise unknown_name("executor", kind, EXECUTORS)
    if jobs is not None and jobs < 1:
        raise UrbanProfileError(f"--jobs must be at least 1, got {jobs}")
    if address is not None and kind != "ray":
        raise UrbanProfileError("--address needs --executor ray")
    if kind == "ray":
        require("ray", "ray")  # fail before any data is read
        if address not in (None, "auto"):
            check_ray_address(str(address))
        return RayExecutor(address=address, retries=retries, num_cpus=jobs, threads=threads)
    if kind == "processes" or (jobs is not None and jobs > 1):
        return ProcessExecutor(jobs=jobs or 2, retries=retries, threads=threads)
    return SerialExecutor(retries=retries)
