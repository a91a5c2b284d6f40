"""Run a grid of (dataset, method, seed, task, protocol, head), resumable through the results store."""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from urbanprofile.benchmark.executors import SerialExecutor
from urbanprofile.benchmark.rows import KEY
from urbanprofile.benchmark.store import StoredState
from urbanprofile.benchmark.unit import Unit, finite_number
from urbanprofile.benchmark.versions import CodeVersion, code_version, dataset_fingerprint
from urbanprofile.data.city import CityData
from urbanprofile.data.registry import discover, get_entry, list_datasets
from urbanprofile.data.tasks import KNOWN_TASKS
from urbanprofile.errors import DataError, UnknownNameError, UrbanProfileError, unknown_name
from urbanprofile.evaluation.protocols import (
    PROTOCOLS,
    check_protocol,
    check_train_fraction,
    get_protocol,
    protocol_unavailable_reason,
)
from urbanprofile.heads.registry import head_kind, parse_head
from urbanprofile.methods import ExternalMethodSpec, MethodSpec, get_method, list_methods

if TYPE_CHECKING:
    from urbanprofile.benchmark.executors import Executor, UnitResult
    from urbanprofile.benchmark.store import ResultStore
    from urbanprofile.embedders.base import Embedder

DEFAULT_SEEDS = (0, 1, 2, 3, 4)
#: Seeds are stored as 32-bit integers and passed to numpy and torch, which take no negative seed.
MAX_SEED = 2**31 - 1
#: Where ``urbanprofile benchmark`` stores results unless told otherwise.
DEFAULT_STORE = Path("results/urbanprofile.duckdb")
#: Metrics that a result row must have as finite numbers to count as a result.


@dataclass
class BenchmarkPlan:
    """What to run; ``None`` means every dataset, method, task or protocol available.

    ``heads``: head names to probe every embedding with; ``None`` gives each method its own head (ridge,
    or knn for knn-location). Multi-task heads (``moe``, ``mlp-multitask``) fit the plan's tasks jointly.
    """

    datasets: Sequence[str] | None = None
    methods: Sequence[str] | None = None
    tasks: Sequence[str] | None = None
    protocols: Sequence[str] = ("paper", "nested", "spatial")
    seeds: Sequence[int] = DEFAULT_SEEDS
    heads: Sequence[str] | None = None
    #: Tasks per dataset (a suite's pairs); a dataset listed here ignores ``tasks``.
    dataset_tasks: dict[str, Sequence[str]] | None = None
    #: Share of each outer training fold the probes are fit on (label efficiency); rows below 1 are not stored.
    train_fraction: float = 1.0


@dataclass
class StudyConfig:
    """A benchmark study as a file (``urbanprofile benchmark --config study.toml``): the plan and where it runs.

    Flags given with the file override its keys; a key absent from both takes the default here.

    Attributes:
        datasets, methods, tasks, heads: As in :class:`BenchmarkPlan` (``None``: all, or each method's own head).
        protocols: Protocols to run.
        seeds: Seeds of stochastic methods (0 to :data:`MAX_SEED`).
        suite: Task suites instead of ``tasks`` (adds an aggregate per method over each suite).
        embeddings: Embeddings made elsewhere, ``NAME=FILE,...``, run as methods ``file:NAME``.
        checkpoints: Pretrained UrbanFusion checkpoint folders, run frozen as methods
            ``urbanfusion:ckpt-<content hash>``.
        store: DuckDB results store.
        executor: ``serial``, ``processes`` or ``ray``.
        jobs: Local worker processes (or CPUs of a local Ray instance); ``None``: the executor's choice.
        address: Ray cluster to join (``auto`` or ``HOST:PORT``); ``None``: a local Ray instance.
        retries: Retries of a unit whose worker died or raised.
    """

    datasets: list[str] | None = None
    methods: list[str] | None = None
    tasks: list[str] | None = None
    protocols: list[str] = field(default_factory=lambda: list(BenchmarkPlan.protocols))
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    heads: list[str] | None = None
    suite: list[str] | None = None
    embeddings: str | None = None
    checkpoints: list[str] | None = None
    store: Path = DEFAULT_STORE
    executor: str = "serial"
    jobs: int | None = None
    address: str | None = None
    retries: int = 2


@dataclass
class BenchmarkOutcome:
    """What a run did. ``rows`` are new (including failed rows), ``resumed_rows`` were reused from the store;
    ``recomputed`` pairs each stored row that was replaced (computed by other code, or failed) with its new row."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    n_resumed: int = 0
    wall_seconds: float = 0.0
    resumed_rows: list[dict[str, Any]] = field(default_factory=list)
    recomputed: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    n_units: int = 0

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("status") == "failed"]


class BenchmarkInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``outcome`` holds what finished (and was written to the store) before it."""

    def __init__(self, outcome: BenchmarkOutcome) -> None:
        super().__init__("interrupted")
        self.outcome = outcome


def check_seeds(seeds: Sequence[int]) -> None:
    """Seeds must be whole numbers in ``0 .. 2**31 - 1`` (stored as 32-bit integers; numpy takes no negative)."""
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed <= MAX_SEED:
            raise UrbanProfileError(f"seed {seed!r} is out of range: seeds are whole numbers from 0 to {MAX_SEED}")


def dataset_identity(name: str, data_dir: str | Path | None = None) -> str:
    """The one name under which a dataset's plan cells and rows are keyed.

    A dataset of the data directory is its registry name. A built dataset folder given by path is the registry
    name of the same folder when the data directory holds it, otherwise its resolved path: two folders of the same
    city name stay apart, and the same folder resumes whatever path leads to it.
    """
    entry = get_entry(name, data_dir)
    if entry.family != "built" or not (Path(name).expanduser() / "manifest.json").is_file():
        return entry.name
    try:
        known = discover(data_dir)
    except UrbanProfileError:  # no data directory: the path is the identity
        known = {}
    for other in known.values():
        if other.family == "built" and other.path.resolve() == entry.path.resolve():
            return other.name
    return str(entry.path.resolve())


def validate_plan(plan: BenchmarkPlan, data_dir: str | Path | None) -> tuple[list[str], list[MethodSpec]]:
    """Resolve names up front so that a typo fails before any work, with the valid names listed."""
    datasets = list(plan.datasets) if plan.datasets else list_datasets(data_dir)
    known_tasks = set(KNOWN_TASKS)
    for name in datasets:
        known_tasks.update(get_entry(name, data_dir).declared_tasks)
    methods = [get_method(m) for m in (plan.methods or list_methods())]
    unusual = [t for t in plan.tasks or () if t not in known_tasks]
    if unusual:  # a typo, or a dataset's own indicator (olinda's census variables): read the datasets' tasks
        own = _dataset_tasks(datasets, data_dir)
        for task in unusual:
            if task not in own:
                whose = ", ".join(datasets) if len(datasets) <= 3 else f"the {len(datasets)} datasets"
                raise UnknownNameError(f"{unknown_name('task', task, own)} (the tasks of {whose})")
    for protocol in plan.protocols:
        check_protocol(protocol)
    for head in plan.heads or ():
        parse_head(head)
    if not plan.seeds:
        raise UrbanProfileError("at least one seed is needed (--seeds 0,1,2)")
    check_seeds(plan.seeds)
    if not plan.protocols:
        raise UrbanProfileError(f"at least one protocol is needed; valid: {', '.join(PROTOCOLS)}")
    return datasets, methods


def _dataset_tasks(datasets: list[str], data_dir: str | Path | None) -> set[str]:
    """The tasks these datasets have (reads each one's labels; used only when a task name is not a common one)."""
    tasks: set[str] = set()
    for name in datasets:
        entry = get_entry(name, data_dir)
        tasks.update(entry.declared_tasks if entry.family == "built" else entry.load().tasks)
    return tasks


def plan_units(
    plan: BenchmarkPlan,
    data_dir: str | Path | None = None,
    cities: dict[str, CityData] | None = None,
    stored: dict[tuple[Any, ...], StoredState] | None = None,
) -> tuple[list[Unit], list[tuple[Any, ...]], list[tuple[Any, ...]], list[str], dict[str, CityData]]:
    """Split the grid into units, leaving out cells whose stored row is current.

    A stored row is reused only if it succeeded, was computed by the same code version and on a dataset with the
    same content (:func:`urbanprofile.benchmark.versions.dataset_fingerprint`); a failed row, one from other code
    or one from other data is recomputed (and replaced). Datasets are keyed by :func:`dataset_identity`.

    Returns:
        The units to run, the keys reused, the keys to recompute, what was skipped, and the loaded cities (by
        dataset identity).
    """
    cities = dict(cities or {})
    datasets = list(plan.datasets) if plan.datasets else None
    if datasets is None or any(d not in cities for d in datasets):
        datasets, methods = validate_plan(plan, data_dir)
    else:
        methods = [get_method(m) for m in (plan.methods or list_methods())]
        for protocol in plan.protocols:
            check_protocol(protocol)
        for head in plan.heads or ():
            parse_head(head)
        check_seeds(plan.seeds)
    check_train_fraction(plan.train_fraction)
    stored = stored or {}
    units: list[Unit] = []
    reused: list[tuple[Any, ...]] = []
    replaced: list[tuple[Any, ...]] = []
    skipped: list[str] = []
    fingerprints: dict[str, str] = {}
    misfits: dict[str, list[str]] = {}  # method -> why it cannot run, per dataset
    for given in datasets:
        name = given if given in cities else dataset_identity(given, data_dir)
        if name in fingerprints:  # the same dataset named twice (by name and by path)
            continue
        if name not in cities:
            cities[name] = get_entry(given, data_dir).load()
        city = cities[name]
        # Once per dataset per run: hashing the arrays takes a fraction of a second even on CityView.
        fingerprint = fingerprints[name] = dataset_fingerprint(city)
        wanted = (plan.dataset_tasks or {}).get(given, (plan.dataset_tasks or {}).get(name, plan.tasks))
        tasks = [t for t in (wanted or city.tasks) if t in city.tasks]
        for t in wanted or ():
            if t not in city.tasks:
                skipped.append(f"{name}: no task {t!r} (it has {', '.join(city.tasks)})")
        protocols = list(plan.protocols)
        for protocol in list(protocols):
            if get_protocol(protocol).unavailable_reason(city):
                protocols.remove(protocol)
                skipped.append(f"{name}: {protocol} protocol skipped (no region locations)")
        for registered in methods:
            reason = registered.unavailable_reason(city)
            if reason:
                skipped.append(f"{name}: {reason}")
                misfits.setdefault(registered.name, []).append(reason)
                continue
            spec = registered.for_city(city)  # reads the views the city has
            heads = list(plan.heads or [spec.head])
            skipped += [f"{name}: {spec.name}: {reason}" for h in heads for p in protocols
                        if (reason := protocol_unavailable_reason(h, p))]
            # A subsampled training fold is drawn with the seed, so every seed runs then.
            seeds = list(plan.seeds) if spec.stochastic or plan.train_fraction != 1 else list(plan.seeds)[:1]
            # Heads with weights vary with the seed too, so every seed runs when one is asked for.
            if not spec.stochastic and any(not head_kind(parse_head(h)).probe for h in heads):
                seeds = list(plan.seeds)
            for seed in seeds:
                todo = []
                for task, protocol, head in ((t, p, h) for t in tasks for p in protocols for h in heads):
                    if protocol_unavailable_reason(head, protocol):
                        continue  # said once per method below
                    key = (name, task, spec.name, spec.config_hash, protocol, int(seed), head)
                    if key in stored and _current(stored[key], code_version(spec.factory, head), fingerprint):
                        reused.append(key)
                        continue
                    if key in stored:
                        replaced.append(key)
                    todo.append((task, protocol, head))
                if todo:
                    units.append(Unit(name, spec, int(seed), tuple(todo), fingerprint, plan.train_fraction))
    for spec in methods:
        # An embedding file that fits none of the datasets is a user mistake, not a skip.
        if isinstance(spec, ExternalMethodSpec) and len(misfits.get(spec.name, ())) == len(fingerprints):
            raise DataError(misfits[spec.name][0])
    return units, reused, replaced, skipped, cities


def _current(state: StoredState, version: CodeVersion, fingerprint: str) -> bool:
    """Whether a stored row can be reused: it succeeded, on the same data, computed by the same code."""
    return (state.status == "ok" and state.dataset_fingerprint == fingerprint
            and version.matches(state.code_version, state.code_modules))


def run_benchmark(
    plan: BenchmarkPlan,
    data_dir: str | Path | None = None,
    store: ResultStore | None = None,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    cities: dict[str, CityData] | None = None,
    on_embedding: Callable[[CityData, MethodSpec, int, Embedder], None] | None = None,
    executor: Executor | None = None,
) -> BenchmarkOutcome:
    """Run the grid; current rows in ``store`` are reused, new ones are written unit by unit as they finish.

    Deterministic methods run once (the first seed); stochastic ones once per seed. An embedding is fit
    once per (dataset, method, seed) -- one unit -- and reused by every task and protocol: embedders never
    see labels. A stored row is reused only if it was computed by the same version of the method's code
    (:mod:`urbanprofile.benchmark.versions`); otherwise it is recomputed, replaced, and listed in
    ``outcome.recomputed``.

    Args:
        plan: What to run.
        data_dir: Data directory (default ``$URBANPROFILE_DATA``).
        store: Results store for resuming and writing; ``None`` keeps results in memory only.
        progress: Show a progress bar on stderr.
        on_row: Called with every requested row: first the reused ones (with ``resumed=True``), then each new
            one as its unit finishes (``resumed=False``); e.g. to print JSON lines.
        cities: Already loaded cities by name (skips loading; used for synthetic data).
        on_embedding: Called with each fitted embedder (serial executor only).
        executor: Where units run (default: serially in this process); see
            :mod:`urbanprofile.benchmark.executors`.
    """

    start = time.perf_counter()
    executor = executor or SerialExecutor()
    if on_embedding is not None and not isinstance(executor, SerialExecutor):
        raise ValueError("on_embedding needs the serial executor (fitted embedders stay in their worker)")
    if store is not None and plan.train_fraction != 1:  # its rows would be keyed like the whole-fold ones
        raise UrbanProfileError("a train fraction below 1 is not kept in the results store: run it without --store")
    stored = store.stored() if store is not None else {}
    units, reused, replaced, skipped, cities = plan_units(plan, data_dir, cities, stored)
    outcome = BenchmarkOutcome(skipped=skipped, n_resumed=len(reused), n_units=len(units))
    if store is not None and (reused or replaced):
        wanted = set(reused) | set(replaced)
        by_key = {tuple(r[k] for k in KEY): r for r in store.rows({
            "dataset": sorted({k[0] for k in wanted}), "method": sorted({k[2] for k in wanted})})}
        outcome.resumed_rows = [by_key[k] for k in reused]
        old_rows = {k: by_key[k] for k in replaced}
    else:
        old_rows = {}
    if on_row is not None:
        for row in outcome.resumed_rows:
            on_row({**row, "resumed": True})

    shown = UnitProgress(executor.name, units, enabled=progress)
    finished = cast("Generator[UnitResult, None, None]", executor.run(
        units, cities, on_embedding=on_embedding, on_epoch=shown.epoch if shown.live else None))
    try:
        with shown:
            for unit, rows, unit_skipped in finished:
                if store is not None:
                    store.put(rows)  # one transaction per unit: a killed run keeps every finished unit
                outcome.skipped += unit_skipped
                for row in rows:
                    key = tuple(row[k] for k in KEY)
                    if key in old_rows:
                        outcome.recomputed.append((old_rows[key], row))
                    outcome.rows.append(row)
                    if on_row is not None:
                        on_row({**row, "resumed": False})
                shown.unit_done(unit, rows)
    except KeyboardInterrupt:
        outcome.wall_seconds = time.perf_counter() - start
        raise BenchmarkInterrupted(outcome) from None
    finally:
        finished.close()  # stops the workers now (not when the generator is collected)
    outcome.wall_seconds = time.perf_counter() - start
    return outcome


class UnitProgress:
    """Progress of a run by units, with an estimate of the time left, and the epochs of the unit training now.

    On a terminal this is a live bar; otherwise (a log file, CI) one line per finished unit, so that a log of a
    long run is never silent. Epochs are shown for methods that report them, one bar per unit in training, in the
    serial and the processes executors.
    """

    def __init__(self, executor: str, units: Sequence[Unit], enabled: bool = True) -> None:
        from rich.console import Console

        self.executor = executor
        self.total = len(units)
        self.done = 0
        self.enabled = enabled and bool(units)
        self.console = Console(stderr=True)
        self.live = self.enabled and self.console.is_terminal
        self._start = time.perf_counter()
        self._bar: Any = None
        self._job: Any = None
        self._epochs: dict[str, Any] = {}  # unit label -> its epoch bar
        self._finished: set[str] = set()

    def __enter__(self) -> UnitProgress:
        self._start = time.perf_counter()
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.table import Column

            # The label gives way in a narrow terminal (a path dataset makes it long); counts and times stay whole.
            self._bar = Progress(TextColumn("{task.description}", table_column=Column(ratio=1, no_wrap=True,
                                                                                     overflow="ellipsis")),
                                 BarColumn(bar_width=12), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("left"), TimeRemainingColumn(),
                                 console=self.console, transient=False, expand=True)
            self._bar.start()
            self._job = self._bar.add_task(f"units ({self.executor})", total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def epoch(self, unit: Unit, epoch: int, total: int) -> None:
        """An epoch of ``unit``'s training finished."""
        if self._bar is None or unit.label in self._finished:  # a worker's last epoch may arrive after its rows
            return
        if unit.label not in self._epochs:
            self._epochs[unit.label] = self._bar.add_task(f"  {unit.label}: epoch", total=total)
        self._bar.update(self._epochs[unit.label], completed=epoch, total=total)

    def unit_done(self, unit: Unit, rows: list[dict[str, Any]]) -> None:
        self.done += 1
        self._finished.add(unit.label)
        if not self.enabled:
            return
        if self._bar is not None:
            if unit.label in self._epochs:
                self._bar.remove_task(self._epochs.pop(unit.label))
            self._bar.update(self._job, advance=1, description=f"units ({self.executor}), last: {unit.label}")
            return
        elapsed = time.perf_counter() - self._start
        left = elapsed / self.done * (self.total - self.done)
        failed = sum(r.get("status") == "failed" for r in rows)
        status = f"{len(rows) - failed} rows" + (f", {failed} failed" if failed else "")
        self.console.print(f"unit {self.done}/{self.total} done: {unit.label} ({status}); "
                           f"{_clock(elapsed)} elapsed, about {_clock(left)} left", highlight=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def describe_recomputed(outcome: BenchmarkOutcome) -> list[str]:
    """One line per method whose stored rows were replaced: why, and how far R^2 moved."""
    by_method: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for old, new in outcome.recomputed:
        by_method.setdefault(new["method"], []).append((old, new))
    lines = []
    for method, pairs in sorted(by_method.items()):
        failed = [p for p in pairs if p[0].get("status") == "failed"]
        other_data = [(old, new) for old, new in pairs if old.get("status") != "failed" and CodeVersion(
            new["code_version"], new["code_modules"] or {}).matches(old.get("code_version"), old.get("code_modules"))]
        changed = [p for p in pairs if p[0].get("status") != "failed" and p not in other_data]
        if failed:
            lines.append(f"{method}: {len(failed)} failed rows retried")
        if other_data:
            datasets = ", ".join(sorted({str(new["dataset"]) for _, new in other_data}))
            lines.append(f"{method}: {len(other_data)} stored rows were computed on other data ({datasets} changed "
                         f"since, or the rows recorded no dataset fingerprint) and were recomputed"
                         f"{_moved(other_data)}")
        if not changed:
            continue
        modules: set[str] = set()
        unknown = 0
        for old, new in changed:
            if not old.get("code_modules"):
                unknown += 1
            else:
                current = CodeVersion(new["code_version"], new["code_modules"] or {})
                modules.update(current.changed_modules(old["code_modules"]))
        why = ", ".join(m.removeprefix("urbanprofile.") for m in sorted(modules)) or "-"
        if unknown:
            why = (f"{why}; " if modules else "") + f"{unknown} rows recorded no code version"
        lines.append(f"{method}: {len(changed)} stored rows came from other code and were recomputed "
                     f"(changed: {why}){_moved(changed)}")
    return lines


def _moved(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    deltas = [abs(new["r2"] - old["r2"]) for old, new in pairs
              if finite_number(new.get("r2")) and finite_number(old.get("r2"))]
    return f"; R² moved by up to {max(deltas):.3f}" if deltas else ""


def leaderboard(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Mean and standard deviation over seeds per (dataset, task, protocol, method, head), best R^2 first.

    Failed rows are left out (they carry no figures)."""
    rows = [r for r in rows if r.get("status") != "failed"]
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    # Rows of an older layout have no head: the default (groupby would drop them silently as NaN keys).
    frame["head"] = frame["head"].fillna("ridge") if "head" in frame else "ridge"
    metrics = ["r2", "mae", "rmse", "worst_block_r2", "r2_gap", "morans_i", "fit_seconds"]
    grouped = frame.groupby(["dataset", "task", "protocol", "method", "head"], sort=False)
    table = grouped[metrics].agg(["mean", "std"])
    table.columns = pd.Index(["_".join(map(str, column)) for column in table.columns])
    table["n_seeds"] = grouped.size()
    table["n_regions"] = grouped["n_regions"].first()
    table = table.reset_index()
    order = {p: i for i, p in enumerate(PROTOCOLS)}
    table["_p"] = table["protocol"].map(order)
    table = table.sort_values(["dataset", "task", "_p", "r2_mean"], ascending=[True, True, True, False])
    return table.drop(columns="_p").reset_index(drop=True)


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if std is None or (isinstance(std, float) and (math.isnan(std) or std == 0)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


def row_to_json(row: dict[str, Any]) -> dict[str, Any]:
    """A row with NaN as null and timestamps as ISO strings."""
    return {k: _json_safe(v) for k, v in row.items()}
