"""Region prompts, answer parsing and verifiable rewards for Urban-R1-style post-training (no torch).

A region becomes a short text: where it is, its points of interest, land use and taxi totals (each with
its percentile among the regions of its city, computed from features only, never labels), and a question
about one indicator. The answer is a level on a fixed scale stated in the prompt (``answer="level"``:
quantile bins of the training regions' labels in that city) or a number (``answer="number"``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from urbanprofile.data.city import CityData, view_csr
from urbanprofile.errors import DataError, UrbanProfileError

#: Plain-language names of the indicators a question can be about.
TASK_WORDS = {
    "checkin": "social-media check-ins",
    "crime": "reported crimes",
    "service_calls": "311 service calls",
    "carbon": "carbon emissions",
    "population": "population",
    "gdp": "GDP",
}
ANSWER_KINDS = ("level", "number")
REWARD_KINDS = ("distance", "exact", "debiased")
_TAGGED = re.compile(r"<answer>\s*([-+]?\d+(?:\.\d+)?)\s*</answer>", re.IGNORECASE)
_ID_NAME = re.compile(r"^[A-Za-z]+_\d+$")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")

SYSTEM_PROMPT = "You estimate urban indicators."


@dataclass(frozen=True)
class Parsed:
    """A parsed completion: the value (``None`` when no number was found) and whether the format was kept."""

    value: float | None
    well_formed: bool


def parse_answer(completion: str, answer: str = "level", n_levels: int = 5) -> Parsed:
    """Read the answer out of a completion; never raises.

    ``<answer>x</answer>`` is the format asked for (well formed). Otherwise the first number in the text is
    taken (not well formed). A level outside ``0 .. n_levels - 1`` or a negative number counts as no answer.
    """
    text = completion if isinstance(completion, str) else str(completion)
    match = _TAGGED.search(text)
    well_formed = match is not None
    raw = match.group(1) if match else None
    if raw is None:
        loose = _NUMBER.search(text)
        raw = loose.group(0) if loose else None
    if raw is None:
        return Parsed(None, False)
    try:
        value = float(raw)
    except ValueError:
        return Parsed(None, False)
    if not math.isfinite(value) or value < 0:
        return Parsed(None, False)
    if answer == "level" and (value != int(value) or value > n_levels - 1):
        return Parsed(None, False)
    return Parsed(value, well_formed)


def format_reward(parsed: Parsed) -> float:
    """1 for ``<answer>value</answer>`` with a valid value, 0.5 for a bare valid value, 0 for none."""
    if parsed.value is None:
        return 0.0
    return 1.0 if parsed.well_formed else 0.5


def accuracy_reward(parsed: Parsed, target: float, answer: str, n_levels: int, tau: float = 2.0) -> float:
    """Closeness of the parsed answer to the truth, in [0, 1]; 0 when nothing parsed.

    Levels: ``1 - |level - true level| / (n_levels - 1)``. Numbers: ``max(0, 1 - |log1p(pred) -
    log1p(true)| / tau)`` (log space: the indicators are heavy-tailed; ``tau = 2`` gives 0 at a factor of
    about e^2 = 7.4 off).
    """
    if parsed.value is None:
        return 0.0
    if answer == "level":
        return float(max(0.0, 1.0 - abs(parsed.value - target) / max(n_levels - 1, 1)))
    err = abs(math.log1p(parsed.value) - math.log1p(max(target, 0.0)))
    return float(max(0.0, 1.0 - err / tau))


def exact_reward(parsed: Parsed, target: float) -> float:
    """1 when the parsed level is the true level, else 0 (levels only)."""
    return float(parsed.value is not None and parsed.value == target)


class AccuracyReward:
    """The accuracy reward of a run: ``distance``, ``exact`` or ``debiased``.

    ``distance`` is :func:`accuracy_reward`. Under it, a policy that ignores the region does best by always
    answering the middle level (the median minimises the expected distance), which is where GRPO collapses.
    ``exact`` (levels only) pays 1 for the true level: with equal-share levels every constant answer earns
    the same 1 / n_levels on average, so only reading the region pays; its signal is sparse. ``debiased``
    keeps the distance shaping but subtracts, for each answer, its mean distance reward over the training
    targets of the region's geographic group (the block the balanced batches draw it from): an answer that
    ignores the region earns 0 on average in every group whatever it is, a region-aware one earns more. An
    unparsed answer earns the lowest value of the kind (0, or -1 when debiased).

    Args:
        kind: One of :data:`REWARD_KINDS`.
        answer: ``level`` or ``number``.
        n_levels: Levels of the scale.
        reference: Training targets per geographic group (needed by ``debiased``).
        tau: Log-error scale of the number reward.
    """

    def __init__(
        self, kind: str, answer: str, n_levels: int, reference: dict[str, np.ndarray] | None = None, tau: float = 2.0
    ) -> None:
        check_reward_kind(kind, answer)
        if kind == "debiased" and not reference:
            raise UrbanProfileError("the debiased reward needs the training targets of every city")
        self.kind = kind
        self.answer = answer
        self.n_levels = n_levels
        self.tau = tau
        self.reference = {group: np.asarray(v, dtype=float) for group, v in (reference or {}).items()}
        self._offsets: dict[tuple[str, float], float] = {}

    def offset(self, value: float, group: str) -> float:
        """Mean distance reward of answering ``value`` for every training region of ``group``."""
        key = (group, value)
        if key not in self._offsets:
            if group not in self.reference or not len(self.reference[group]):
                raise DataError(f"{group}: no training targets to centre the debiased reward on")
            answered = Parsed(value, True)
            self._offsets[key] = float(np.mean(
                [accuracy_reward(answered, t, self.answer, self.n_levels, self.tau) for t in self.reference[group]]
            ))
        return self._offsets[key]

    def __call__(self, parsed: Parsed, target: float, group: str) -> float:
        if self.kind == "exact":
            return exact_reward(parsed, target)
        if self.kind == "distance":
            return accuracy_reward(parsed, target, self.answer, self.n_levels, self.tau)
        if parsed.value is None:
            return -1.0
        return accuracy_reward(parsed, target, self.answer, self.n_levels, self.tau) - self.offset(parsed.value, group)


def check_reward_kind(kind: str, answer: str) -> None:
    if kind not in REWARD_KINDS:
        raise UrbanProfileError(f"reward must be one of {', '.join(REWARD_KINDS)}, got {kind!r}")
    if kind == "exact" and answer != "level":
        raise UrbanProfileError("the exact reward needs answer=level (a number is never exactly right)")


def level_edges(values: np.ndarray, n_levels: int) -> np.ndarray:
    """Inner quantile edges (``n_levels - 1`` of them) of some training labels."""
    if len(values) == 0:
        raise DataError("no training labels to derive the answer levels from")
    return np.quantile(np.asarray(values, dtype=float), np.linspace(0, 1, n_levels + 1)[1:-1])


def to_level(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Level (0 .. len(edges)) of each value under the given edges."""
    return np.searchsorted(edges, np.asarray(values, dtype=float), side="right").astype(int)


def _percentile(column: pd.Series) -> pd.Series:
    return (column.rank(pct=True, method="average") * 100).round().astype(int)


def _fmt_int(value: float) -> str:
    return str(round(value))


@dataclass
class RegionDescriber:
    """Turns regions of one city into text (features only; percentiles over all regions of the city).

    Args:
        city: The city.
        city_label: How the prompt names the city (default: the dataset name).
        top_categories: POI categories and land-use classes listed by name.
        captions: Optional text per region (e.g. a CityView caption), appended to the description.
    """

    city: CityData
    city_label: str | None = None
    top_categories: int = 3
    captions: pd.Series | None = None
    _derived: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        views = self.city.views
        if "poi_counts" in views:
            poi = views["poi_counts"].astype(float)
            total = poi.sum(axis=1)
            self._derived["poi"] = poi
            self._derived["poi_total"] = total
            self._derived["poi_pct"] = _percentile(total)
        if "landuse_counts" in views:
            landuse = views["landuse_counts"].astype(float)
            self._derived["landuse_share"] = landuse.div(landuse.sum(axis=1).replace(0, np.nan), axis=0).fillna(0)
        if "od_flows" in views:
            out, into = taxi_totals(self.city)
            self._derived["trips_out"], self._derived["trips_in"] = out, into
            self._derived["trips_pct"] = _percentile(out + into)
        if not self._derived and not self.city.has_locations and self.captions is None:
            raise DataError(f"{self.city.name}: nothing to describe a region with (no views, locations or captions)")

    @property
    def label(self) -> str:
        return self.city_label or self.city.name

    def describe(self, region_id: Any) -> str:
        """A few short lines about one region (short prompts: every token costs on 2 CPU cores)."""
        d = self._derived
        head = f"{self.label}, region {region_id}"
        if self.city.has_locations:
            lon, lat = self.city.regions.loc[region_id, ["lon", "lat"]].to_numpy(dtype=float)
            head += f" at ({lat:.3f}, {lon:.3f})"
        lines = [head + "."]
        if "poi" in d:
            row = d["poi"].loc[region_id]
            top = row[row > 0].sort_values(ascending=False).head(self.top_categories if _named(row.index) else 0)
            listed = ", ".join(f"{name} {_fmt_int(v)}" for name, v in top.items())
            lines.append(
                f"POIs: {_fmt_int(d['poi_total'].loc[region_id])}, more than {d['poi_pct'].loc[region_id]}% of "
                f"regions" + (f" ({listed})." if listed else ".")
            )
        if "landuse_share" in d and _named(d["landuse_share"].columns):
            share = d["landuse_share"].loc[region_id]
            top = share[share > 0].sort_values(ascending=False).head(2)
            if len(top):
                lines.append("Land use: " + ", ".join(f"{name} {round(100 * v)}%" for name, v in top.items()) + ".")
        if "trips_out" in d:
            lines.append(
                f"Taxi trips: {_fmt_int(d['trips_out'].loc[region_id])} out, {_fmt_int(d['trips_in'].loc[region_id])}"
                f" in, more than {d['trips_pct'].loc[region_id]}% of regions."
            )
        if self.captions is not None and region_id in self.captions.index:
            caption = str(self.captions.loc[region_id]).strip()
            if caption:
                lines.append(caption)
        return "\n".join(lines)


def taxi_totals(city: CityData) -> tuple[pd.Series, pd.Series]:
    """Trips out of and into every region (row and column sums of ``od_flows``)."""
    od = city.views["od_flows"]
    values = view_csr(od)
    out = pd.Series(np.asarray(values.sum(axis=1)).ravel(), index=od.index, dtype=float)
    into = pd.Series(np.asarray(values.sum(axis=0)).ravel(), index=od.index, dtype=float)
    return out, into


def _named(columns: pd.Index) -> bool:
    """Whether category names mean something (``poi_3``-style ids only cost prompt tokens)."""
    return not all(_ID_NAME.match(str(c)) for c in columns)


def question(task: str, city_label: str, answer: str, n_levels: int) -> str:
    """The question about one indicator, with the answer format and scale stated."""
    what = TASK_WORDS.get(task, task.replace("_", " "))
    if answer == "level":
        return (
            f"Level of {what} here, from 0 (fewest) to {n_levels - 1} (most), each level an equal share of the "
            f"regions of {city_label}? Reply "
            + ", ".join(f"<answer>{k}</answer>" for k in range(n_levels - 1))
            + f" or <answer>{n_levels - 1}</answer>."
        )
    return f"Number of {what} here? Reply with one number, for example <answer>100</answer>."


def check_answer_kind(answer: str, n_levels: int) -> None:
    if answer not in ANSWER_KINDS:
        raise UrbanProfileError(f"answer must be one of {', '.join(ANSWER_KINDS)}, got {answer!r}")
    if answer == "level" and not 2 <= n_levels <= 10:
        raise UrbanProfileError(f"n_levels must be between 2 and 10 (one digit), got {n_levels}")
