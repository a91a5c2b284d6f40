"""A unit of benchmark work, run in any process: fit a method once, probe it on each (task, protocol, head).

Executors (:mod:`urbanprofile.benchmark.executors`) run units; the runner (:mod:`urbanprofile.benchmark.runner`)
plans them and stores their rows. Both import this module, neither imports the other back.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from urbanprofile.benchmark.rows import make_row
from urbanprofile.data.city import CityData
from urbanprofile.embedders.base import ReportsEpochs, candidates_of
from urbanprofile.errors import MethodUnavailableError, UrbanProfileError
from urbanprofile.evaluation.protocols import (
    ProtocolResult,
    evaluate_embedding,
    evaluate_tasks,
)
from urbanprofile.heads.registry import parse_head
from urbanprofile.methods import MethodSpec

#: The figures that must be finite for a row to count as computed.
_MAIN_METRICS = ("mae", "rmse", "r2")

if TYPE_CHECKING:
    from urbanprofile.embedders.base import Embedder


@dataclass(frozen=True)
class Unit:
    """One unit of work: fit ``spec`` on ``dataset`` with ``seed``, then probe it on each (task, protocol, head)."""

    dataset: str
    spec: MethodSpec
    seed: int
    cells: tuple[tuple[str, str, str], ...]
    #: The content fingerprint of the dataset (:func:`urbanprofile.benchmark.versions.dataset_fingerprint`).
    fingerprint: str | None = None
    train_fraction: float = 1.0

    def keys(self) -> list[tuple[Any, ...]]:
        return [(self.dataset, t, self.spec.name, self.spec.config_hash, p, self.seed, h) for t, p, h in self.cells]

    @property
    def label(self) -> str:
        return f"{self.dataset} {self.spec.name} seed {self.seed}"


def result_row(
    city: CityData, spec: MethodSpec, seed: int, result: ProtocolResult, embed_seconds: float,
    dataset: str | None = None, fingerprint: str | None = None,
) -> dict[str, Any]:
    """One store row from a protocol result, keyed by ``dataset`` (default: the city's name)."""
    return make_row(dataset or city.name, spec, seed, result.task, result.protocol, result.head, result=result,
                    embed_seconds=embed_seconds, fingerprint=fingerprint).as_dict()


def failed_rows(unit: Unit, reason: str) -> list[dict[str, Any]]:
    """Rows that say a unit failed (every metric missing) and why, in one line."""
    return [make_row(unit.dataset, unit.spec, unit.seed, task, protocol, head, error=reason,
                     fingerprint=unit.fingerprint).as_dict() for task, protocol, head in unit.cells]


def one_line(error: BaseException) -> str:
    """``Type: first line of the message`` of an exception."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".strip()


def run_unit(
    unit: Unit, city: CityData, on_embedding: Callable[[CityData, MethodSpec, int, Embedder], None] | None = None,
    on_epoch: Callable[[Unit, int, int], None] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Fit one method with one seed and probe it on every (task, protocol, head) of the unit.

    A multi-task head (``moe``, ``mlp-multitask``) is fit once per protocol on all the unit's tasks jointly.

    A user-level error (e.g. a diverged training) gives failed rows at once: it would recur on a retry with
    the same seed. Any other exception propagates, so that the executor can retry the unit. A result whose
    MAE, RMSE or R² is not a finite number (e.g. labels near 1e300 overflow) is a failed row that says so; the
    numeric warnings behind it are summarised in its reason rather than printed one by one.

    Args:
        unit: What to fit and probe.
        city: The unit's dataset.
        on_embedding: Called with the fitted embedder.
        on_epoch: Called with ``(unit, epoch, total)`` after each training epoch, for methods that report them.

    Returns:
        The unit's rows and the cells skipped (with their one-line reason).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        rows, skipped = _run_unit(unit, city, on_embedding, on_epoch)
    numeric = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    for w in caught:  # other warnings are not ours to hide
        if not issubclass(w.category, RuntimeWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    out = []
    for row in rows:
        bad = [m for m in _MAIN_METRICS if row.get("status") == "ok" and not finite_number(row.get(m))]
        if bad:
            cause = f"; {len(numeric)} numeric warnings, first: {numeric[0].message}" if numeric else ""
            cell = Unit(unit.dataset, unit.spec, unit.seed, ((row["task"], row["protocol"], row["head"]),),
                        unit.fingerprint)
            [row] = failed_rows(cell, f"non-finite metrics ({', '.join(f'{m}={row.get(m)}' for m in bad)}): the "
                                      f"values overflow or are not numbers{cause}")
        out.append(row)
    if numeric and all(r.get("status") == "ok" for r in out):
        warnings.warn(f"{unit.label}: {len(numeric)} numeric warnings while fitting and probing (first: "
                      f"{numeric[0].message}); the metrics are finite", RuntimeWarning, stacklevel=2)
    return out, skipped


def finite_number(value: Any) -> bool:
    """Whether a row's figure is a finite number (``None``, NaN and infinities are not)."""
    return isinstance(value, int | float | np.number) and math.isfinite(float(value))


def _run_unit(
    unit: Unit, city: CityData, on_embedding: Callable[[CityData, MethodSpec, int, Embedder], None] | None,
    on_epoch: Callable[[Unit, int, int], None] | None,
) -> tuple[list[dict[str, Any]], list[str]]:
    spec, seed = unit.spec, unit.seed
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []

    def row(result: ProtocolResult) -> dict[str, Any]:
        made = result_row(city, spec, seed, result, embed_seconds, unit.dataset, unit.fingerprint)
        if result.train_fraction != 1:  # a label-efficiency point: the JSON row says which share it was fit on
            made.update(train_fraction=result.train_fraction, n_train=result.n_train)
        return made

    try:
        t0 = time.perf_counter()
        embedder = spec.build(random_state=seed)
        if on_epoch is not None and isinstance(embedder, ReportsEpochs):
            embedder.on_epoch = lambda epoch, total: on_epoch(unit, epoch, total)
        embedding = embedder.fit_transform(city)
        embed_seconds = time.perf_counter() - t0
    except MethodUnavailableError as err:
        return [], [f"{unit.dataset}: {err}"]
    except UrbanProfileError as err:
        return failed_rows(unit, one_line(err)), []
    candidates = candidates_of(embedder)
    if on_embedding is not None:
        on_embedding(city, spec, seed, embedder)
    joint: dict[tuple[str, str], list[str]] = {}  # (protocol, multi-task head) -> tasks
    for task, protocol, head in unit.cells:
        if parse_head(head).multitask:
            joint.setdefault((protocol, head), []).append(task)
            continue
        try:
            result = evaluate_embedding(city, embedding, task, protocol, head, seed, candidates=candidates,
                                        train_fraction=unit.train_fraction)
        except MethodUnavailableError as err:
            skipped.append(f"{unit.dataset}: {err}")
            continue
        except UrbanProfileError as err:
            rows += failed_rows(Unit(unit.dataset, spec, seed, ((task, protocol, head),), unit.fingerprint),
                                one_line(err))
            continue
        rows.append(row(result))
    for (protocol, head), tasks in joint.items():
        cells = tuple((t, protocol, head) for t in tasks)
        try:
            results = evaluate_tasks(city, embedding, tasks, protocol, head, seed, train_fraction=unit.train_fraction)
        except MethodUnavailableError as err:
            skipped.append(f"{unit.dataset}: {err}")
            continue
        except UrbanProfileError as err:
            rows += failed_rows(Unit(unit.dataset, spec, seed, cells, unit.fingerprint), one_line(err))
            continue
        rows += [row(result) for result in results]
    return rows, skipped
