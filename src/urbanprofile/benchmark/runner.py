"""Run a grid of (dataset, method, seed, task, protocol, head), resumable through the results store."""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from urbanprofile import __version__
from urbanprofile.benchmark.store import KEY
from urbanprofile.benchmark.versions import CodeVersion, code_version
from urbanprofile.data.city import CityData
from urbanprofile.data.registry import get_entry, list_datasets
from urbanprofile.data.tasks import KNOWN_TASKS
from urbanprofile.errors import MethodUnavailableError, UrbanProfileError, unknown_name
from urbanprofile.evaluation.protocols import (
    PROTOCOLS,
    ProtocolResult,
    check_protocol,
    evaluate_embedding,
    evaluate_tasks,
)
from urbanprofile.heads.registry import parse_head, protocol_unavailable_reason
from urbanprofile.methods import MethodSpec, get_method, list_methods
from urbanprofile.threads import current_threads

if TYPE_CHECKING:
    from urbanprofile.benchmark.executors import Executor
    from urbanprofile.benchmark.store import ResultStore
    from urbanprofile.embedders.base import Embedder

DEFAULT_SEEDS = (0, 1, 2, 3, 4)


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


@dataclass(frozen=True)
class Unit:
    """One unit of work: fit ``spec`` on ``dataset`` with ``seed``, then probe it on each (task, protocol, head)."""

    dataset: str
    spec: MethodSpec
    seed: int
    cells: tuple[tuple[str, str, str], ...]

    def keys(self) -> list[tuple[Any, ...]]:
        return [(self.dataset, t, self.spec.name, self.spec.config_hash, p, self.seed, h) for t, p, h in self.cells]

    @property
    def label(self) -> str:
        return f"{self.dataset} {self.spec.name} seed {self.seed}"


def validate_plan(plan: BenchmarkPlan, data_dir: str | Path | None) -> tuple[list[str], list[MethodSpec]]:
    """Resolve names up front so that a typo fails before any work, with the valid names listed."""
    datasets = list(plan.datasets) if plan.datasets else list_datasets(data_dir)
    known_tasks = set(KNOWN_TASKS)
    for name in datasets:
        known_tasks.update(get_entry(name, data_dir).declared_tasks)
    methods = [get_method(m) for m in (plan.methods or list_methods())]
    for task in plan.tasks or ():
        if task not in known_tasks:
            raise unknown_name("task", task, known_tasks)
    for protocol in plan.protocols:
        check_protocol(protocol)
    for head in plan.heads or ():
        parse_head(head)
    if not plan.seeds:
        raise UrbanProfileError("at least one seed is needed (--seeds 0,1,2)")
    if not plan.protocols:
        raise UrbanProfileError(f"at least one protocol is needed; valid: {', '.join(PROTOCOLS)}")
    return datasets, methods


def result_row(
    city: CityData, spec: MethodSpec, seed: int, result: ProtocolResult, embed_seconds: float
) -> dict[str, Any]:
    """One store row from a protocol result."""
    bias = result.bias
    version = code_version(spec.factory)
    return {
        "dataset": city.name,
        "task": result.task,
        "method": spec.name,
        "modalities": list(spec.params["modalities"]) if spec.params.get("modalities") else None,
        "config_hash": spec.config_hash,
        "protocol": result.protocol,
        "seed": int(seed),
        "head": result.head,
        "n_regions": result.n_regions,
        **result.metrics,
        "worst_block_r2": bias["worst_block_r2"],
        "r2_gap": bias["r2_gap"],
        "worst_block_mae": bias["worst_block_mae"],
        "morans_i": bias["morans_i"],
        "bias_weights": bias["weights"],
        "block_r2": bias["block_r2"],
        "block_mae": bias["block_mae"],
        "chosen": result.chosen,
        "embed_seconds": embed_seconds,
        "head_seconds": result.head_seconds,
        "fit_seconds": embed_seconds + result.head_seconds,
        "package_version": __version__,
        "created_at": dt.datetime.now(dt.UTC).replace(tzinfo=None),
        "code_version": version.version,
        "code_modules": version.modules,
        "status": "ok",
        "error": None,
        "threads": current_threads(),
        "views": list(spec.all_views) or None,
    }


def failed_rows(unit: Unit, reason: str) -> list[dict[str, Any]]:
    """Rows that say a unit failed (every metric missing) and why, in one line."""
    version = code_version(unit.spec.factory)
    reason = " ".join(reason.split())
    return [
        {"dataset": unit.dataset, "task": task, "method": unit.spec.name, "config_hash": unit.spec.config_hash,
         "protocol": protocol, "seed": unit.seed, "head": head, "package_version": __version__,
         "created_at": dt.datetime.now(dt.UTC).replace(tzinfo=None), "code_version": version.version,
         "code_modules": version.modules, "status": "failed", "error": reason, "threads": current_threads(),
         "views": list(unit.spec.all_views) or None}
        for task, protocol, head in unit.cells
    ]


def one_line(error: BaseException) -> str:
    """``Type: first line of the message`` of an exception."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".strip()


def run_unit(
    unit: Unit, city: CityData, on_embedding: Callable[[CityData, MethodSpec, int, Embedder], None] | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Fit one method with one seed and probe it on every (task, protocol, head) of the unit.

    A multi-task head (``moe``, ``mlp-multitask``) is fit once per protocol on all the unit's tasks jointly.

    A user-level error (e.g. a diverged training) gives failed rows at once: it would recur on a retry with
    the same seed. Any other exception propagates, so that the executor can retry the unit.

    Returns:
        The unit's rows and the cells skipped (with their one-line reason).
    """
    spec, seed = unit.spec, unit.seed
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    try:
        t0 = time.perf_counter()
        embedder = spec.build(random_state=seed)
        embedding = embedder.fit_transform(city)
        embed_seconds = time.perf_counter() - t0
    except MethodUnavailableError as err:
        return [], [f"{unit.dataset}: {err}"]
    except UrbanProfileError as err:
        return failed_rows(unit, one_line(err)), []
    candidates = getattr(embedder, "candidates_", None)
    if on_embedding is not None:
        on_embedding(city, spec, seed, embedder)
    joint: dict[tuple[str, str], list[str]] = {}  # (protocol, multi-task head) -> tasks
    for task, protocol, head in unit.cells:
        if parse_head(head).multitask:
            joint.setdefault((protocol, head), []).append(task)
            continue
        try:
            result = evaluate_embedding(city, embedding, task, protocol, head, seed, candidates=candidates)
        except MethodUnavailableError as err:
            skipped.append(f"{unit.dataset}: {err}")
            continue
        except UrbanProfileError as err:
            rows += failed_rows(Unit(unit.dataset, spec, seed, ((task, protocol, head),)), one_line(err))
            continue
        rows.append(result_row(city, spec, seed, result, embed_seconds))
    for (protocol, head), tasks in joint.items():
        cells = tuple((t, protocol, head) for t in tasks)
        try:
            results = evaluate_tasks(city, embedding, tasks, protocol, head, seed)
        except MethodUnavailableError as err:
            skipped.append(f"{unit.dataset}: {err}")
            continue
        except UrbanProfileError as err:
            rows += failed_rows(Unit(unit.dataset, spec, seed, cells), one_line(err))
            continue
        rows += [result_row(city, spec, seed, result, embed_seconds) for result in results]
    return rows, skipped


def plan_units(
    plan: BenchmarkPlan,
    data_dir: str | Path | None = None,
    cities: dict[str, CityData] | None = None,
    stored: dict[tuple[Any, ...], tuple[str | None, str | None]] | None = None,
) -> tuple[list[Unit], list[tuple[Any, ...]], list[tuple[Any, ...]], list[str], dict[str, CityData]]:
    """Split the grid into units, leaving out cells whose stored row is current.

    A stored row is reused only if it succeeded and was computed by the same code version; a failed row or
    one from other code is recomputed (and replaced).

    Returns:
        The units to run, the keys reused, the keys to recompute, what was skipped, and the loaded cities.
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
    stored = stored or {}
    units: list[Unit] = []
    reused: list[tuple[Any, ...]] = []
    replaced: list[tuple[Any, ...]] = []
    skipped: list[str] = []
    for name in datasets:
        if name not in cities:
            cities[name] = get_entry(name, data_dir).load()
        city = cities[name]
        tasks = [t for t in (plan.tasks or city.tasks) if t in city.tasks]
        for t in plan.tasks or ():
            if t not in city.tasks:
                skipped.append(f"{name}: no task {t!r} (it has {', '.join(city.tasks)})")
        protocols = list(plan.protocols)
        if "spatial" in protocols and not city.has_locations:
            protocols.remove("spatial")
            skipped.append(f"{name}: spatial protocol skipped (no region locations)")
        for registered in methods:
            reason = registered.unavailable_reason(city)
            if reason:
                skipped.append(f"{name}: {reason}")
                continue
            spec = registered.for_city(city)  # reads the views the city has
            version = code_version(spec.factory).version
            heads = list(plan.heads or [spec.head])
            skipped += [f"{name}: {spec.name}: {reason}" for h in heads for p in protocols
                        if (reason := protocol_unavailable_reason(h, p))]
            seeds = list(plan.seeds) if spec.stochastic else list(plan.seeds)[:1]
            # Heads with weights vary with the seed too, so every seed runs when one is asked for.
            if not spec.stochastic and any(parse_head(h).kind not in ("ridge", "knn", "ridge-blocks") for h in heads):
                seeds = list(plan.seeds)
            for seed in seeds:
                todo = []
                for task, protocol, head in ((t, p, h) for t in tasks for p in protocols for h in heads):
                    if protocol_unavailable_reason(head, protocol):
                        continue  # said once per method below
                    key = (name, task, spec.name, spec.config_hash, protocol, int(seed), head)
                    if key in stored and stored[key] == (version, "ok"):
                        reused.append(key)
                        continue
                    if key in stored:
                        replaced.append(key)
                    todo.append((task, protocol, head))
                if todo:
                    units.append(Unit(name, spec, int(seed), tuple(todo)))
    return units, reused, replaced, skipped, cities


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
    from urbanprofile.benchmark.executors import SerialExecutor

    start = time.perf_counter()
    executor = executor or SerialExecutor()
    if on_embedding is not None and not isinstance(executor, SerialExecutor):
        raise ValueError("on_embedding needs the serial executor (fitted embedders stay in their worker)")
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

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    total = len(reused) + sum(len(u.cells) for u in units)
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not progress, transient=False, console=Console(stderr=True),
    )
    with bar:
        job = bar.add_task(f"benchmark ({executor.name})", total=total, completed=len(reused))
        for unit, rows, unit_skipped in executor.run(units, cities, on_embedding=on_embedding):
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
            bar.update(job, advance=len(unit.cells), description=f"{unit.label} done ({executor.name})")
    outcome.wall_seconds = time.perf_counter() - start
    return outcome


def describe_recomputed(outcome: BenchmarkOutcome) -> list[str]:
    """One line per method whose stored rows were replaced: why, and how far R^2 moved."""
    by_method: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for old, new in outcome.recomputed:
        by_method.setdefault(new["method"], []).append((old, new))
    lines = []
    for method, pairs in sorted(by_method.items()):
        failed = [p for p in pairs if p[0].get("status") == "failed"]
        changed = [p for p in pairs if p[0].get("status") != "failed"]
        if failed:
            lines.append(f"{method}: {len(failed)} failed rows retried")
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
        deltas = [abs(new["r2"] - old["r2"]) for old, new in changed
                  if new.get("r2") is not None and old.get("r2") is not None]
        why = ", ".join(m.removeprefix("urbanprofile.") for m in sorted(modules)) or "-"
        if unknown:
            why = (f"{why}; " if modules else "") + f"{unknown} rows recorded no code version"
        moved = f"; R² moved by up to {max(deltas):.3f}" if deltas else ""
        lines.append(f"{method}: {len(changed)} stored rows came from other code and were recomputed "
                     f"(changed: {why}){moved}")
    return lines


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
