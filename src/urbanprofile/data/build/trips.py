"""Trips between regions: recognising trip columns, weights and times, and the OD matrix."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from urbanprofile.data.build.join import assign_points, refuse_points_outside
from urbanprofile.data.build.messages import few, listed, span
from urbanprofile.data.build.points import xy_to_lonlat
from urbanprofile.data.build.regions import id_keys, missing_ids
from urbanprofile.data.build.spec import BuildReport, BuildSpec
from urbanprofile.data.city import SPARSE_VIEW_ABOVE
from urbanprofile.data.io import RawTable, not_a_number, parse_numbers
from urbanprofile.errors import DataError

if TYPE_CHECKING:
    import geopandas as gpd


#: Trip-table columns recognised without ``trip_columns``: region ids, or coordinates of both ends.
TRIP_ID_COLUMNS = ("origin", "destination")
TRIP_COORD_COLUMNS = ("o_lon", "o_lat", "d_lon", "d_lat")
#: How public trip tables name the two ends (names are compared lower-case, with spaces and dashes as ``_``):
#: NYC TLC taxi (pickup/dropoff, PU/DO), Chicago taxi (``Pickup Centroid Latitude``), bike shares (start/end,
#: ``start station latitude``), and ``origin_``/``destination_`` prefixes.
_TRIP_ENDS = {
    "o": ("o", "origin", "orig", "pickup", "pick_up", "pu", "start", "from", "source", "src"),
    "d": ("d", "destination", "dest", "dropoff", "drop_off", "do", "end", "to", "target", "dst"),
}
_TRIP_INFIX = r"(?:_?(?:station|centroid|stop|point|location))?_?"
_TRIP_COORD = {"lon": ("lon", "lng", "long", "longitude", "x"), "lat": ("lat", "latitude", "y")}
#: Region-id names only: station ids of bike shares are not region ids, so their coordinates are used instead.
_TRIP_REGION = ("region", "region_id", "zone", "zone_id", "locationid", "location_id", "community_area",
                "area", "id")
#: Departure-time columns recognised without ``trip_time_column`` (first present wins).
TRIP_TIME_COLUMNS = ("time", "departure_time", "start_time", "starttime", "started_at", "pickup_datetime",
                     "tpep_pickup_datetime", "lpep_pickup_datetime", "trip_start_timestamp", "pickup_time")
#: Trip-count columns recognised without ``trip_weight_column`` (one row then stands for that many trips).
TRIP_WEIGHT_COLUMNS = ("trips", "n_trips", "trip_count", "num_trips", "count", "counts", "n", "weight", "weights",
                       "flow", "flows", "volume")
#: ``trip_weight_column`` value that makes every row one trip even when a count-like column is present.
NO_TRIP_WEIGHT = "none"


def _trip_hours(values: pd.Series, where: str, column: str) -> np.ndarray:
    """Hour of day (0-24) from datetimes or from numbers that already are hours."""
    numbers, _, bad = parse_numbers(values)
    if not bad.any():  # numbers (or CSV text of numbers) already are hours
        hours = numbers
    else:
        stamps = pd.to_datetime(values, errors="coerce", format="mixed")
        if stamps.notna().sum() == 0 and values.notna().any():
            raise DataError(f"{where}: column {column!r} holds neither times nor hours of day")
        hours = (stamps.dt.hour + stamps.dt.minute / 60 + stamps.dt.second / 3600).to_numpy(dtype=float)
    finite = np.isfinite(hours)
    if ((hours[finite] < 0) | (hours[finite] >= 24)).any():
        raise DataError(f"{where}: column {column!r}: hours of day must be in [0, 24)")
    return hours


def _normalised(column: object) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(column).strip().lower()).strip("_")


def trip_columns(columns: Iterable[object], where: str = "trips") -> list[str]:
    """The columns holding the two ends of each trip, recognised by name.

    Tried in order: ``origin,destination`` (region ids); coordinates of both ends (``o_lon`` ...,
    ``pickup_longitude``, ``start_lat``/``start_lng``, ``Pickup Centroid Latitude``,
    ``origin_lon`` ...); region ids of both ends (``origin_id``, ``PULocationID``,
    ``pickup_community_area`` ...).

    Returns:
        Two id columns (origin, destination) or four coordinate columns (o_lon, o_lat, d_lon, d_lat).

    Raises:
        DataError: If no set of columns is recognised, or one end has two candidates for the same role.
    """
    names = [str(c) for c in columns]
    if set(TRIP_ID_COLUMNS) <= set(names):
        return list(TRIP_ID_COLUMNS)
    found: dict[tuple[str, str], list[str]] = {}
    for name in names:
        key = _normalised(name)
        for end, prefixes in _TRIP_ENDS.items():
            ends = "|".join(sorted(prefixes, key=len, reverse=True))
            roles = [*((role, alias) for role, aliases in _TRIP_COORD.items() for alias in aliases),
                     *(("id", alias) for alias in _TRIP_REGION)]
            for role, alias in roles:
                infix = _TRIP_INFIX if role != "id" else "_?"  # a station id is no region id
                if re.fullmatch(rf"(?:{ends}){infix}{alias}", key):
                    found.setdefault((end, role), []).append(name)
                    break
    role_sets: tuple[tuple[str, ...], ...] = (("lon", "lat"), ("id",))
    for wanted in role_sets:
        slots = [(end, role) for end in ("o", "d") for role in wanted]
        if all(slot in found for slot in slots):
            for slot in slots:
                if len(found[slot]) > 1:
                    raise DataError(f"{where}: columns {', '.join(map(repr, found[slot]))} could all be the "
                                    f"{'origin' if slot[0] == 'o' else 'destination'} {slot[1]}; "
                                    "name the columns with --trip-columns")
            return [found[slot][0] for slot in slots]
    raise DataError(f"{where}: no trip ends recognised: needs origin,destination (region ids), o_lon,o_lat,d_lon,"
                    f"d_lat, pickup_/dropoff_ or start_/end_ coordinates (or --trip-columns); columns: "
                    f"{listed(names)}")


def trip_weight_column(columns: Iterable[object], taken: Iterable[str], where: str = "trips") -> str | None:
    """The column holding how many trips a row stands for, recognised by name (:data:`TRIP_WEIGHT_COLUMNS`).

    Raises:
        DataError: If two columns could be the count.
    """
    skip = set(taken)
    found = [str(c) for c in columns if str(c) not in skip and _normalised(c) in TRIP_WEIGHT_COLUMNS]
    if len(found) > 1:
        raise DataError(f"{where}: columns {', '.join(map(repr, found))} could each be the number of trips per row; "
                        "name it with --trip-weight")
    return found[0] if found else None


def _trip_weights(raw: RawTable, column: str) -> tuple[np.ndarray, np.ndarray]:
    """Trips per row from a count column: the weights and a mask of rows whose count is missing.

    Raises:
        DataError: Naming the line of a count that is not a number, infinite or negative.
    """
    numbers, missing, bad = parse_numbers(raw.frame[column])
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(f"{raw.where(row)}: trip count {column!r}: {not_a_number(raw.frame[column].iloc[row])} "
                        f"({int(bad.sum())} such rows)")
    wrong = ~missing & (~np.isfinite(numbers) | (numbers < 0))
    if wrong.any():
        row = int(np.argmax(wrong))
        raise DataError(f"{raw.where(row)}: trip count {column!r} is {numbers[row]:g}; counts must be finite and "
                        f">= 0 ({int(wrong.sum())} such rows)")
    return np.where(missing, 0.0, numbers), missing


def od_from_trips(
    trips: pd.DataFrame | RawTable, regions: gpd.GeoDataFrame, spec: BuildSpec, report: BuildReport,
    where: str = "trips", assign: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> tuple[Any, pd.DataFrame | None]:
    """Trip counts between regions (the OD matrix) and, with a time column, per time-of-day pattern.

    Each row is one trip, or as many as its count column says (``--trip-weight``, or a column named like
    ``trips``/``count``/``n``/``weight``/``flow``). Trips with a missing end (or count) are dropped and
    counted; so are trips with an end outside every region.

    ``assign`` joins trip ends (lon, lat arrays) to region positions like :func:`assign_points` (default: that
    function, in this process; a distributed build joins them on its cluster).

    Returns:
        The (N, N) OD matrix (a SciPy CSR matrix above :data:`SPARSE_VIEW_ABOVE` regions, else a dense array)
        and (pattern, origin, destination, trips) rows, or ``None`` without times.

    Raises:
        DataError: No trip joins two regions (the OD matrix would be all zeros), or a count is not a number or
            negative (the message names the line).
    """
    raw = trips if isinstance(trips, RawTable) else RawTable(Path(where), trips, np.arange(1, len(trips) + 1))
    counts = TripCounts(regions, spec, report, where, raw.frame.columns,
                        assign or (lambda lon, lat: assign_points(lon, lat, regions, spec.engine)))
    counts.add(raw)
    return counts.finish(lambda: iter([raw]))


#: What :meth:`TripCounts.merge` adds up: the accumulator's fields and the report's trip counts.
_MERGED = ("n_rows", "n_located", "n_origins_inside", "any_both_inside", "weighted_read", "weighted_kept", "integral",
           "id_examples", "low", "high", "pairs", "patterns")
_REPORT_COUNTS = ("n_trips_malformed", "n_trips_read", "n_trips_unreadable", "n_trips_missing", "n_trips_outside",
                  "n_trips_kept")


class TripCounts:
    """Trips summed per (origin, destination) and per (time pattern, origin, destination), one table or chunk at a
    time, so that a trip file can be read in chunks (only the pairs that are not zero are kept).

    Args:
        regions: The regions.
        spec: Trip columns, time and weight columns, time patterns, CRS and join engine.
        report: Where the trip figures go.
        where: The file, for messages.
        columns: The trip table's columns (the ends, time and weight columns are recognised from them once).
        assign: Region positions of points (lon, lat arrays), -1 outside.
    """

    def __init__(self, regions: gpd.GeoDataFrame, spec: BuildSpec, report: BuildReport, where: str,
                 columns: Iterable[object], assign: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
        names = [str(c) for c in columns]
        self.regions, self.spec, self.report, self.where, self.assign = regions, spec, report, where, assign
        self.ends = list(spec.trip_columns) if spec.trip_columns else trip_columns(names, where)
        missing = [c for c in self.ends if c not in names]
        if missing:
            raise DataError(f"{where}: no column {missing[0]!r} (columns: {listed(names)})")
        self.time_column = spec.trip_time_column or next((c for c in names if _normalised(c) in TRIP_TIME_COLUMNS),
                                                         None)
        weight = spec.trip_weight_column or trip_weight_column(
            names, [*self.ends, *([self.time_column] if self.time_column else [])], where)
        self.weight_column = None if weight == NO_TRIP_WEIGHT and NO_TRIP_WEIGHT not in names else weight
        if self.time_column is not None and self.time_column not in names:
            raise DataError(f"{where}: no time column {self.time_column!r} (columns: {listed(names)})")
        if self.weight_column is not None and self.weight_column not in names:
            raise DataError(f"{where}: no trip count column {self.weight_column!r} (columns: {listed(names)})")
        report.trip_columns = list(self.ends)
        if self.weight_column is not None:
            report.trip_weight_column = self.weight_column
        if self.time_column is not None:
            report.n_time_patterns = spec.n_time_patterns
        self.n_rows = self.n_located = self.n_origins_inside = 0
        self.any_both_inside = False  # a located trip with both ends in a region, whatever its time or count
        self.weighted_read = self.weighted_kept = 0.0
        self.integral = True
        self.id_examples: list[str] = []  # the first distinct ids of trips with both ends, for the message
        self.low, self.high = np.full(2, np.inf), np.full(2, -np.inf)  # extent of located origins
        self.pairs: list[pd.Series] = []
        self.patterns: list[pd.Series] = []
        for name in ("n_trips_malformed", "n_trips_read", "n_trips_unreadable", "n_trips_missing",
                     "n_trips_outside", "n_trips_kept"):
            setattr(report, name, 0)

    def _located(self, table: pd.DataFrame) -> tuple[np.ndarray, ...]:
        """Rows with both ends' coordinates, rows unreadable, and the ends in degrees (o_lon, o_lat, d_lon, d_lat)."""
        parsed = [parse_numbers(table[c]) for c in self.ends]
        xy = [numbers for numbers, _, _ in parsed]
        unreadable = np.any([bad for _, _, bad in parsed], axis=0)
        keep = np.isfinite(np.column_stack(xy)).all(axis=1)
        o_lon, o_lat = xy_to_lonlat(xy[0], xy[1], self.spec.crs, self.where)
        d_lon, d_lat = xy_to_lonlat(xy[2], xy[3], self.spec.crs, self.where)
        return keep, unreadable, o_lon, o_lat, d_lon, d_lat

    def ends_to_join(self, table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """The lon, lat of the trip ends that :meth:`add` joins for this table, in the order it joins them (origins,
        then destinations, of the rows with both ends located); empty for trips given as region ids."""
        if len(self.ends) == 2:
            return np.zeros(0), np.zeros(0)
        keep, _, o_lon, o_lat, d_lon, d_lat = self._located(table)
        return np.concatenate([o_lon[keep], d_lon[keep]]), np.concatenate([o_lat[keep], d_lat[keep]])

    def summary(self) -> dict[str, Any]:
        """What this accumulator counted (of one chunk, on a worker), for :meth:`merge` into another."""
        return {**{name: getattr(self, name) for name in _MERGED},
                "report": {name: getattr(self.report, name) for name in _REPORT_COUNTS}}

    def merge(self, chunk: dict[str, Any]) -> None:
        """Add the :meth:`summary` of one chunk, as :meth:`add` would have added the chunk itself (chunks in file
        order give the same sums, float sums included, and the same first ids)."""
        for name in _REPORT_COUNTS:
            setattr(self.report, name, getattr(self.report, name) + chunk["report"][name])
        self.n_rows += chunk["n_rows"]
        self.n_located += chunk["n_located"]
        self.n_origins_inside += chunk["n_origins_inside"]
        self.any_both_inside = self.any_both_inside or chunk["any_both_inside"]
        self.weighted_read += chunk["weighted_read"]
        self.weighted_kept += chunk["weighted_kept"]
        self.integral = self.integral and chunk["integral"]
        self.low, self.high = np.minimum(self.low, chunk["low"]), np.maximum(self.high, chunk["high"])
        if len(self.ends) == 2 and len(self.id_examples) <= 3:
            # The chunk's first 4 distinct ids hold every id the whole chunk would add to at most 3 earlier ones.
            self.id_examples = list(dict.fromkeys([*self.id_examples, *chunk["id_examples"]]))[:4]
        self.pairs += chunk["pairs"]
        self.patterns += chunk["patterns"]
        if len(self.pairs) > 8:  # merged as add merges them, so that the sums are the same
            self.pairs = [pd.concat(self.pairs).groupby(level=[0, 1]).sum()]
            self.patterns = [pd.concat(self.patterns).groupby(level=[0, 1, 2]).sum()] if self.patterns else []

    def _ends(self, table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Origin and destination positions (-1 outside), rows with both ends given, rows unreadable."""
        n = len(self.regions)
        columns = self.ends
        unreadable = np.zeros(len(table), dtype=bool)
        if len(columns) == 2:
            keys = pd.Series(np.arange(n), index=id_keys(self.regions.index))
            ends = []
            present = ~missing_ids(table[columns[0]]) & ~missing_ids(table[columns[1]])
            for column in columns:
                found = keys.reindex(id_keys(table[column].where(present, "")).to_numpy())
                ends.append(np.where(present, found.fillna(-1).to_numpy(dtype=np.int64), -1))
            return ends[0], ends[1], np.asarray(present, dtype=bool), unreadable
        keep, unreadable, o_lon, o_lat, d_lon, d_lat = self._located(table)
        both = self.assign(np.concatenate([o_lon[keep], d_lon[keep]]), np.concatenate([o_lat[keep], d_lat[keep]]))
        origin = np.full(len(table), -1, dtype=np.int64)
        dest = np.full(len(table), -1, dtype=np.int64)
        origin[keep], dest[keep] = both[: keep.sum()], both[keep.sum():]
        if keep.any():
            self.n_located += int(keep.sum())
            self.n_origins_inside += int((origin[keep] >= 0).sum())
            self.any_both_inside = self.any_both_inside or bool(((origin >= 0) & (dest >= 0)).any())
            self.low = np.minimum(self.low, [np.nanmin(o_lon[keep]), np.nanmin(o_lat[keep])])
            self.high = np.maximum(self.high, [np.nanmax(o_lon[keep]), np.nanmax(o_lat[keep])])
        return origin, dest, keep, unreadable

    def add(self, raw: RawTable) -> None:
        """Add the trips of one table (a whole file, or one chunk of it)."""
        table, report = raw.frame, self.report
        report.n_trips_malformed += len(raw.malformed)
        report.n_trips_read += len(table) + len(raw.malformed)
        self.n_rows += len(table)
        origin, dest, present, unreadable = self._ends(table)
        hours = None
        if self.time_column is not None:
            hours = _trip_hours(table[self.time_column], self.where, self.time_column)
        weights = np.ones(len(table))
        if self.weight_column is not None:
            weights, no_count = _trip_weights(raw, self.weight_column)
            present = present & ~no_count
        if hours is not None:
            present = present & np.isfinite(hours)
        inside = present & (origin >= 0) & (dest >= 0)
        report.n_trips_unreadable += int(unreadable.sum())
        report.n_trips_missing += int((~present & ~unreadable).sum())
        report.n_trips_outside += int((present & ~inside).sum())
        report.n_trips_kept += int(inside.sum())
        self.weighted_read += float(weights.sum())
        self.weighted_kept += float(weights[inside].sum())
        self.integral = self.integral and bool((weights == np.round(weights)).all())
        if len(self.ends) == 2 and len(self.id_examples) <= 3:
            self.id_examples = list(dict.fromkeys([*self.id_examples, *table[self.ends[0]][present].astype(str)]))[:4]
        if not inside.any():
            return
        pattern = None
        if hours is not None:
            n_patterns = self.spec.n_time_patterns
            pattern = np.minimum((hours[inside] / (24 / n_patterns)).astype(np.int64), n_patterns - 1)
        self.keep(origin[inside], dest[inside], pattern, weights[inside])

    def keep(self, origin: np.ndarray, dest: np.ndarray, pattern: np.ndarray | None, weights: np.ndarray) -> None:
        """Sum one chunk's trips with both ends in a region (origin and destination positions, time pattern or
        ``None``, trips per row): kept in memory here; a partitioned build spills them to disk by origin block."""
        key = pd.MultiIndex.from_arrays([origin, dest], names=["o", "d"])
        self.pairs.append(pd.Series(weights, index=key).groupby(level=[0, 1]).sum())
        if pattern is not None:
            key = pd.MultiIndex.from_arrays([pattern, origin, dest], names=["pattern", "o", "d"])
            self.patterns.append(pd.Series(weights, index=key).groupby(level=[0, 1, 2]).sum())
        if len(self.pairs) > 8:  # merge, so that memory follows the distinct pairs, not the chunks read
            self.pairs = [pd.concat(self.pairs).groupby(level=[0, 1]).sum()]
            self.patterns = [pd.concat(self.patterns).groupby(level=[0, 1, 2]).sum()] if self.patterns else []

    def finish(self, reread: Callable[[], Iterator[RawTable]]) -> tuple[Any, pd.DataFrame | None]:
        """The OD matrix and the pattern rows (``None`` without times), as :func:`od_from_trips` returns them.

        Args:
            reread: The tables again (only read when no trip joins two regions, to tell swapped columns).

        Raises:
            DataError: No trip joins two regions, or every count is 0.
        """
        n = len(self.regions)
        dtype, pairs, grouped = self.totals(reread)
        origin = pairs.index.get_level_values(0).to_numpy()
        dest = pairs.index.get_level_values(1).to_numpy()
        od: Any
        if n > SPARSE_VIEW_ABOVE:
            # A large city's OD matrix is mostly zeros: N x N dense would be 0.8 GB at 10,000 cells, 80 GB at 100,000.
            from scipy import sparse

            od = sparse.coo_matrix((pairs.to_numpy().astype(dtype), (origin, dest)), shape=(n, n)).tocsr()
            od.sum_duplicates()
        else:
            od = np.zeros((n, n), dtype=dtype)
            od[origin, dest] = pairs.to_numpy().astype(dtype)
        if grouped is None:
            return od, None
        ids = self.regions.index
        pattern_rows = pd.DataFrame({"pattern": grouped.index.get_level_values(0).to_numpy(),
                                     "origin": ids[grouped.index.get_level_values(1).to_numpy()],
                                     "destination": ids[grouped.index.get_level_values(2).to_numpy()],
                                     "trips": grouped.to_numpy().astype(dtype)})
        return od, pattern_rows

    def totals(self, reread: Callable[[], Iterator[RawTable]]) -> tuple[np.dtype, pd.Series, pd.Series | None]:
        """The checks of :meth:`finish` and its sums: the count dtype, trips per (origin, destination) position
        pair and per (pattern, origin, destination) (``None`` without times), each sorted by its keys.

        Raises:
            DataError: As :meth:`finish`.
        """
        dtype = self.check(reread)
        pairs = pd.concat(self.pairs).groupby(level=[0, 1]).sum()
        grouped = pd.concat(self.patterns).groupby(level=[0, 1, 2]).sum() if self.time_column is not None else None
        return dtype, pairs, grouped

    def check(self, reread: Callable[[], Iterator[RawTable]]) -> np.dtype:
        """The checks of :meth:`finish` (the trip figures of the report completed); the dtype of the counts.

        Raises:
            DataError: As :meth:`finish`.
        """
        report, where = self.report, self.where
        report.trips_weighted_read = self.weighted_read
        report.trips_weighted_kept = self.weighted_kept
        if self.n_located and not self.any_both_inside:  # say why: swapped, or somewhere else
            refuse_points_outside(self.n_located, self.n_origins_inside, lambda: self._swapped(reread),
                                  lambda: span(np.array([self.low[0], self.high[0]]),
                                               np.array([self.low[1], self.high[1]])),
                                  self.regions, where, "trip origins",
                                  " (name the columns in o_lon,o_lat,d_lon,d_lat order with --trip-columns)")
        if not report.n_trips_kept:
            detail = (f"ids {few(self.id_examples)} vs regions {few(self.regions.index)}"
                      if len(self.ends) == 2 and self.id_examples else f"{report.n_trips_missing} missing an end")
            raise DataError(f"{where}: none of the {self.n_rows} trips has both ends in a region ({detail}); the OD "
                            "matrix would be all zeros")
        if report.trips_weighted_kept == 0:
            raise DataError(f"{where}: every trip count in {self.weight_column!r} is 0; the OD matrix would be all "
                            "zeros")
        return np.dtype(np.int64 if self.integral else float)

    def _swapped(self, reread: Callable[[], Iterator[RawTable]]) -> int:
        """Trip origins inside a region with longitude and latitude swapped (0 when latitudes cannot be swapped)."""
        if max(abs(self.low[1]), abs(self.high[1])) > 180:
            return 0
        total = 0
        for raw in reread():
            xy = [parse_numbers(raw.frame[c])[0] for c in self.ends[:2]]
            keep = np.isfinite(np.column_stack([parse_numbers(raw.frame[c])[0] for c in self.ends])).all(axis=1)
            lon, lat = xy_to_lonlat(xy[0], xy[1], self.spec.crs, self.where)
            total += int((self.assign(lat[keep], lon[keep]) >= 0).sum())
        return total
