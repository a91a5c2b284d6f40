"""Trips between regions: recognising trip columns, weights and times, and the OD matrix."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from urbanprofile.data.build.join import assign_points, check_points_inside
from urbanprofile.data.build.messages import few, listed
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
    where: str = "trips",
) -> tuple[Any, pd.DataFrame | None]:
    """Trip counts between regions (the OD matrix) and, with a time column, per time-of-day pattern.

    Each row is one trip, or as many as its count column says (``--trip-weight``, or a column named like
    ``trips``/``count``/``n``/``weight``/``flow``). Trips with a missing end (or count) are dropped and
    counted; so are trips with an end outside every region.

    Returns:
        The (N, N) OD matrix (a SciPy CSR matrix above :data:`SPARSE_VIEW_ABOVE` regions, else a dense array)
        and (pattern, origin, destination, trips) rows, or ``None`` without times.

    Raises:
        DataError: No trip joins two regions (the OD matrix would be all zeros), or a count is not a number or
            negative (the message names the line).
    """
    raw = trips if isinstance(trips, RawTable) else RawTable(Path(where), trips, np.arange(1, len(trips) + 1))
    table = raw.frame
    columns = list(spec.trip_columns) if spec.trip_columns else trip_columns(table.columns, where)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"{where}: no column {missing[0]!r} (columns: {listed(table.columns)})")
    report.trip_columns = list(columns)
    report.n_trips_malformed = len(raw.malformed)
    n = len(regions)
    report.n_trips_read = len(table) + len(raw.malformed)
    time_column = spec.trip_time_column or next(
        (c for c in table.columns if _normalised(c) in TRIP_TIME_COLUMNS), None)
    weight_column = spec.trip_weight_column or trip_weight_column(
        table.columns, [*columns, *([time_column] if time_column else [])], where)
    if weight_column == NO_TRIP_WEIGHT and NO_TRIP_WEIGHT not in table.columns:
        weight_column = None
    unreadable = np.zeros(len(table), dtype=bool)
    if len(columns) == 2:
        keys = pd.Series(np.arange(n), index=id_keys(regions.index))
        ends = []
        present = ~missing_ids(table[columns[0]]) & ~missing_ids(table[columns[1]])
        for column in columns:
            found = keys.reindex(id_keys(table[column].where(present, "")).to_numpy())
            ends.append(np.where(present, found.fillna(-1).to_numpy(dtype=np.int64), -1))
        origin, dest = ends
    else:
        parsed = [parse_numbers(table[c]) for c in columns]
        xy = [numbers for numbers, _, _ in parsed]
        unreadable = np.any([bad for _, _, bad in parsed], axis=0)
        present = np.isfinite(np.column_stack(xy)).all(axis=1)
        o_lon, o_lat = xy_to_lonlat(xy[0], xy[1], spec.crs, where)
        d_lon, d_lat = xy_to_lonlat(xy[2], xy[3], spec.crs, where)
        keep = present
        both = assign_points(np.concatenate([o_lon[keep], d_lon[keep]]), np.concatenate([o_lat[keep], d_lat[keep]]),
                             regions, spec.engine)
        origin = np.full(len(table), -1, dtype=np.int64)
        dest = np.full(len(table), -1, dtype=np.int64)
        origin[keep], dest[keep] = both[: keep.sum()], both[keep.sum():]
        if keep.any() and not ((origin >= 0) & (dest >= 0)).any():  # say why: swapped, or somewhere else
            check_points_inside(o_lon[keep], o_lat[keep], origin[keep], regions, spec.engine, where, "trip origins",
                                " (name the columns in o_lon,o_lat,d_lon,d_lat order with --trip-columns)")
    hours = None
    if time_column is not None:
        if time_column not in table.columns:
            raise DataError(f"{where}: no time column {time_column!r} (columns: {listed(table.columns)})")
        hours = _trip_hours(table[time_column], where, time_column)
    weights = np.ones(len(table))
    if weight_column is not None:
        if weight_column not in table.columns:
            raise DataError(f"{where}: no trip count column {weight_column!r} (columns: {listed(table.columns)})")
        weights, no_count = _trip_weights(raw, weight_column)
        present = present & ~no_count
        report.trip_weight_column = weight_column
    present_mask = np.asarray(present, dtype=bool)
    if hours is not None:
        present_mask = present_mask & np.isfinite(hours)
    inside = present_mask & (origin >= 0) & (dest >= 0)
    report.n_trips_unreadable = int(unreadable.sum())
    report.n_trips_missing = int((~present_mask & ~unreadable).sum())
    report.n_trips_outside = int((present_mask & ~inside).sum())
    report.n_trips_kept = int(inside.sum())
    report.trips_weighted_read = float(weights.sum())
    report.trips_weighted_kept = float(weights[inside].sum())
    if not inside.any():
        detail = (f"ids {few(table[columns[0]][present_mask])} vs regions {few(regions.index)}"
                  if len(columns) == 2 and present_mask.any() else f"{report.n_trips_missing} missing an end")
        raise DataError(f"{where}: none of the {len(table)} trips has both ends in a region ({detail}); the OD "
                        "matrix would be all zeros")
    if report.trips_weighted_kept == 0:
        raise DataError(f"{where}: every trip count in {weight_column!r} is 0; the OD matrix would be all zeros")
    integral = bool((weights == np.round(weights)).all())
    dtype = np.dtype(np.int64 if integral else float)
    od: Any
    if n > SPARSE_VIEW_ABOVE:
        # A large city's OD matrix is mostly zeros: N x N dense would be 0.8 GB at 10,000 cells, 80 GB at 100,000.
        from scipy import sparse

        od = sparse.coo_matrix((weights[inside].astype(dtype), (origin[inside], dest[inside])), shape=(n, n)).tocsr()
        od.sum_duplicates()
    else:
        od = np.zeros((n, n), dtype=dtype)
        np.add.at(od, (origin[inside], dest[inside]), weights[inside].astype(dtype))
    if hours is None:
        return od, None
    report.n_time_patterns = spec.n_time_patterns
    pattern = np.minimum((hours[inside] / (24 / spec.n_time_patterns)).astype(np.int64), spec.n_time_patterns - 1)
    rows = pd.DataFrame({"pattern": pattern, "o": origin[inside], "d": dest[inside],
                         "w": weights[inside].astype(dtype)})
    grouped = rows.groupby(["pattern", "o", "d"])["w"].sum().reset_index(name="trips")
    ids = regions.index
    pattern_rows = pd.DataFrame({"pattern": grouped["pattern"].to_numpy(), "origin": ids[grouped["o"].to_numpy()],
                                 "destination": ids[grouped["d"].to_numpy()], "trips": grouped["trips"].to_numpy()})
    return od, pattern_rows


