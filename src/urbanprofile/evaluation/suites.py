"""Named task suites (dataset x task pairs) and one aggregate per method over a suite.

A suite says which tasks of which datasets a benchmark runs (``benchmark --suite``); the aggregate puts every
method on one line: mean R² over the suite's pairs, mean rank across pairs with a bootstrap interval over pairs,
and wins against the best raw-feature baseline on the same folds (the protocols' folds do not depend on the seed,
so every method of a pair is scored on the same folds).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from urbanprofile.data.indicators import ACS_CAVEAT, ACS_INDICATORS
from urbanprofile.errors import unknown_name

#: Methods whose best one (per pair) is the bar a learned embedding must clear.
RAW_PREFIX = "raw-"
#: Bootstrap draws over pairs for the mean-rank interval, and their seed.
N_BOOTSTRAP = 1000
BOOTSTRAP_SEED = 0

_GRAPH_TASKS = ("checkin", "crime", "service_calls")
_CITYVIEW_TASKS = ("carbon", "population", "gdp")
_ACS_TASKS = (*(i.task for i in ACS_INDICATORS), "acs_density")
#: Coordinates alone explain most of a gridded indicator under random folds, so those pairs are read under spatial.
_CITYVIEW_CAVEAT = ("CityView's tiles are a dense grid: coordinates alone (knn-location) explain most of their "
                    "indicators under random folds, so read the cityview-* pairs under the spatial protocol")
_ACS_HINT = ("the acs_* tasks of hafusion-nyc come from `urbanprofile attach hafusion-nyc --councilcount 2023 --out "
             "DIR` with URBANPROFILE_INDICATORS=DIR (pip install 'urbanprofile[indicators]')")


@dataclass(frozen=True)
class Suite:
    """A named set of (dataset, task) pairs.

    Attributes:
        name: ``core``, ``socioeconomic``, ``all``.
        description: One line.
        pairs: Tasks per dataset.
        notes: Said when a pair of the suite is skipped (how to get its tasks).
        caveats: Said beside every aggregate of the suite (what limits its figures).
    """

    name: str
    description: str
    pairs: dict[str, tuple[str, ...]]
    notes: tuple[str, ...] = field(default=())
    caveats: tuple[str, ...] = field(default=())

    @property
    def n_pairs(self) -> int:
        return sum(len(t) for t in self.pairs.values())


_CORE = Suite("core", "the peers' labels: check-ins, crime, 311 calls (NYC, Chicago); carbon, population, GDP "
              "(CityView Beijing, Guangzhou)",
              {"hafusion-nyc": _GRAPH_TASKS, "hafusion-chicago": _GRAPH_TASKS,
               "cityview-beijing": _CITYVIEW_TASKS, "cityview-guangzhou": _CITYVIEW_TASKS})
_SOCIO = Suite("socioeconomic", "indicators from independent public sources: NYC ACS 5-year by NTA onto Manhattan's "
               "180 regions (rates vary between ~30 residential NTAs only); CityView's carbon, population and GDP "
               "(Beijing, Guangzhou) and UrbanVLP's Beijing indicators",
               {"hafusion-nyc": _ACS_TASKS, "cityview-beijing": _CITYVIEW_TASKS, "cityview-guangzhou": _CITYVIEW_TASKS,
                "cityview-beijing-urbanvlp": ("population", "gdp", "nightlight", "houseprice")},
               notes=(_ACS_HINT,), caveats=(ACS_CAVEAT, _CITYVIEW_CAVEAT))


def _union(name: str, description: str, suites: Sequence[Suite]) -> Suite:
    pairs: dict[str, tuple[str, ...]] = {}
    for suite in suites:
        for dataset, tasks in suite.pairs.items():
            pairs[dataset] = tuple(dict.fromkeys([*pairs.get(dataset, ()), *tasks]))
    return Suite(name, description, pairs, tuple(n for s in suites for n in s.notes),
                 tuple(c for s in suites for c in s.caveats))


SUITES: dict[str, Suite] = {s.name: s for s in (_CORE, _SOCIO, _union("all", "core and socioeconomic",
                                                                      [_CORE, _SOCIO]))}


def get_suite(name: str) -> Suite:
    """A suite by name, or a one-line error listing the valid ones."""
    if name not in SUITES:
        raise unknown_name("suite", name, SUITES)
    return SUITES[name]


def plan_suite(suite: Suite, available: Iterable[str], datasets: Sequence[str] | None = None
               ) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """The suite's tasks per dataset that can run here, and one line per pair left out and why.

    Args:
        suite: The suite.
        available: Datasets found in the data directory.
        datasets: Restrict to these datasets (``--datasets``); ``None`` keeps all of the suite's.
    """
    found = set(available)
    chosen: dict[str, tuple[str, ...]] = {}
    skipped: list[str] = []
    for dataset, tasks in suite.pairs.items():
        if datasets is not None and dataset not in datasets:
            continue
        if dataset not in found:
            skipped += [f"{dataset} {task}: dataset not in the data directory (suite {suite.name})" for task in tasks]
            continue
        chosen[dataset] = tasks
    for dataset in datasets or ():
        if dataset not in suite.pairs:
            skipped.append(f"{dataset}: not part of suite {suite.name!r} (its datasets: {', '.join(suite.pairs)})")
    return chosen, skipped


def suite_aggregate(rows: list[dict[str, Any]], suite: Suite | None = None) -> pd.DataFrame:
    """One row per (protocol, method, head) over the suite's pairs that every method of the protocol was scored on.

    Comparing means and ranks over different pairs would mislead, so a pair that some method could not run on
    (a missing view, a failed row) is left out of every method's figures; ``n_pairs`` says how many pairs each
    method ran on in all, ``n_common`` how many the figures use.

    Columns: ``mean_r2``; ``mean_rank`` (1 = best R² of a pair, ties averaged) with ``rank_low``/``rank_high``,
    the 2.5 and 97.5 percentiles of the mean rank over the common pairs resampled with replacement; ``wins`` of
    ``n_compared``: common pairs where the method's R² beats the best raw-feature baseline (``raw-*``) other than
    itself. R² per pair is the mean over seeds; folds do not depend on the seed, so all are on the same folds.

    Args:
        rows: Result rows (failed rows are left out).
        suite: Keep only its pairs (``None``: every pair in ``rows``).
    """
    ok = [r for r in rows if r.get("status") != "failed" and r.get("r2") is not None]
    if suite is not None:
        ok = [r for r in ok if r["task"] in suite.pairs.get(r["dataset"], ())]
    if not ok:
        return pd.DataFrame()
    frame = pd.DataFrame(ok)
    frame["head"] = frame["head"].fillna("ridge") if "head" in frame else "ridge"
    per_pair = frame.groupby(["protocol", "dataset", "task", "method", "head"], sort=False)["r2"].mean().reset_index()
    out = []
    for protocol, part in per_pair.groupby("protocol", sort=False):
        table = part.pivot_table(index=["dataset", "task"], columns=["method", "head"], values="r2")
        n_pairs = table.notna().sum(axis=0).to_numpy()
        common = table.dropna(axis=0, how="any")
        if common.empty:
            continue
        r2 = common.to_numpy(dtype=float)
        ranks = common.rank(axis=1, ascending=False, method="average").to_numpy(dtype=float)
        draws = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(common), size=(N_BOOTSTRAP, len(common)))
        boot = ranks[draws].mean(axis=1)  # (draws, methods)
        entries = [(str(key[0]), str(key[1])) for key in common.columns]
        raw_columns = [i for i, (method, _) in enumerate(entries) if method.startswith(RAW_PREFIX)]
        for j, (method, head) in enumerate(entries):
            others = [i for i in raw_columns if i != j]
            wins = int((r2[:, j] > r2[:, others].max(axis=1)).sum()) if others else 0
            out.append({
                "protocol": protocol, "method": method, "head": head, "n_pairs": int(n_pairs[j]),
                "n_common": len(common), "mean_r2": float(r2[:, j].mean()), "mean_rank": float(ranks[:, j].mean()),
                "rank_low": float(np.percentile(boot[:, j], 2.5)), "rank_high": float(np.percentile(boot[:, j], 97.5)),
                "wins": wins, "n_compared": len(common) if others else 0, "n_methods": len(entries),
            })
    if not out:
        return pd.DataFrame()
    result = pd.DataFrame(out)
    return result.sort_values(["protocol", "mean_rank", "mean_r2"], ascending=[True, True, False]).reset_index(
        drop=True)


def wins_text(row: Mapping[Any, Any]) -> str:
    """An aggregate row's wins against the best raw baseline, ``wins/n_compared``; ``-`` where no other ``raw-*``
    baseline ran on its pairs (a ``raw-*`` method alone among them, or none at all: nothing to win against)."""
    return f"{row['wins']}/{row['n_compared']}" if row["n_compared"] else "-"
