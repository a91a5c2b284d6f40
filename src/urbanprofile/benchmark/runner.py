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
from urbanprofile.heads.registry import parse_head
from urbanprofile.methods import MethodSpec, get_method, list_methods

if TYPE_CHECKING:
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
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    n_resumed: int = 0
    wall_seconds: float = 0.0


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
    }


def run_benchmark(
    plan: BenchmarkPlan,
    data_dir: str | Path | None = None,
    store: ResultStore | None = None,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    cities: dict[str, CityData] | None = None,
    on_embedding: Callable[[CityData, MethodSpec, int, Embedder], None] | None = None,
) -> BenchmarkOutcome:
    """Run the grid; rows already in ``store`` are skipped, new ones are written as they finish.

    Deterministic methods run once (the first seed); stochastic ones once per seed. An embedding is fit
    once per (dataset, method, seed) and reused by every task and protocol: embedders never see labels.

    Args:
        plan: What to run.
        data_dir: Data directory (default ``$URBANPROFILE_DATA``).
        store: Results store for resuming and writing; ``None`` keeps results in memory only.
        progress: Show a progress bar on stderr.
        on_row: Called with each new row (e.g. to print JSON lines).
        cities: Already loaded cities by name (skips loading; used for synthetic data).
        on_embedding: Called with each fitted embedder (e.g. to study its checkpoints or timings).
    """
    start = time.perf_counter()
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
    done = store.done_keys() if store is not None else set()
    outcome = BenchmarkOutcome()

    # Work is planned per dataset once loaded; the bar's total grows as datasets are read.
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not progress, transient=False, console=Console(stderr=True),
    )
    with bar:
        job = bar.add_task("benchmark", total=None)
        total = 0
        for name in datasets:
            city = cities.get(name) or get_entry(name, data_dir).load()
            tasks = [t for t in (plan.tasks or city.tasks) if t in city.tasks]
            for t in plan.tasks or ():
                if t not in city.tasks:
                    outcome.skipped.append(f"{name}: no task {t!r} (it has {', '.join(city.tasks)})")
            protocols = list(plan.protocols)
            if "spatial" in protocols and not city.has_locations:
                protocols.remove("spatial")
                outcome.skipped.append(f"{name}: spatial protocol skipped (no region locations)")
            for spec in methods:
                reason = spec.unavailable_reason(city)
                if reason:
                    outcome.skipped.append(f"{name}: {reason}")
                    continue
                seeds = list(plan.seeds) if spec.stochastic else list(plan.seeds)[:1]
                heads = list(plan.heads or [spec.head])
                # Heads with weights vary with the seed too, so every seed runs when one is asked for.
                if not spec.stochastic and any(parse_head(h).kind not in ("ridge", "knn") for h in heads):
                    seeds = list(plan.seeds)
                for seed in seeds:
                    cells = [(t, p, h) for t in tasks for p in protocols for h in heads]
                    todo = [(t, p, h) for t, p, h in cells
                            if (name, t, spec.name, spec.config_hash, p, int(seed), h) not in done]
                    total += len(cells)
                    outcome.n_resumed += len(cells) - len(todo)
                    bar.update(job, total=total, advance=len(cells) - len(todo))
                    if not todo:
                        continue
                    bar.update(job, description=f"{name} {spec.name} seed {seed}")
                    t0 = time.perf_counter()
                    embedder = spec.build(random_state=int(seed))
                    embedding = embedder.fit_transform(city)
                    embed_seconds = time.perf_counter() - t0
                    candidates = getattr(embedder, "candidates_", None)
                    if on_embedding is not None:
                        on_embedding(city, spec, int(seed), embedder)
                    joint: dict[tuple[str, str], list[str]] = {}  # (protocol, multi-task head) -> tasks
                    for task, protocol, head in todo:
                        if parse_head(head).multitask:
                            joint.setdefault((protocol, head), []).append(task)
                            continue
                        try:
                            result = evaluate_embedding(city, embedding, task, protocol, head, int(seed),
                                                        candidates=candidates)
                        except MethodUnavailableError as err:
                            outcome.skipped.append(f"{name}: {err}")
                            bar.advance(job)
                            continue
                        _record(city, spec, int(seed), result, embed_seconds, store, outcome, on_row)
                        bar.advance(job)
                    for (protocol, head), _ in joint.items():
                        try:  # all of the plan's tasks jointly; rows already stored are not written again
                            results = evaluate_tasks(city, embedding, tasks, protocol, head, int(seed))
                        except MethodUnavailableError as err:
                            outcome.skipped.append(f"{name}: {err}")
                            bar.advance(job, len(joint[(protocol, head)]))
                            continue
                        for result in results:
                            if result.task in joint[(protocol, head)]:
                                _record(city, spec, int(seed), result, embed_seconds, store, outcome, on_row)
                                bar.advance(job)
    outcome.wall_seconds = time.perf_counter() - start
    return outcome


def _record(
    city: CityData, spec: MethodSpec, seed: int, result: ProtocolResult, embed_seconds: float,
    store: ResultStore | None, outcome: BenchmarkOutcome, on_row: Callable[[dict[str, Any]], None] | None,
) -> None:
    row = result_row(city, spec, seed, result, embed_seconds)
    if store is not None:
        store.add(row)
    outcome.rows.append(row)
    if on_row is not None:
        on_row(row)


def leaderboard(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Mean and standard deviation over seeds per (dataset, task, protocol, method, head), best R^2 first."""
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    if "head" not in frame:
        frame["head"] = "ridge"
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
