"""Build a dataset from raw geodata files: regionalize, load, join, aggregate, write (srai's verbs).

A city analyst brings region polygons (or only a boundary, cut into H3 cells), POI points with a
category, land-use polygons, trips and indicator values; :func:`build_dataset` turns them into a
built dataset folder (:mod:`urbanprofile.data.loaders.built`) that the registry discovers and every
embedder and protocol accepts. Each step is a public function that can be used on its own.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from urbanprofile.data.city import SPARSE_VIEW_ABOVE, CityData, frame_from_array, sparse_square_view
from urbanprofile.data.io import (
    NA_TOKENS,
    RawTable,
    centroid_lonlat,
    first_line,
    load_json,
    not_a_number,
    parse_numbers,
    read_raw_table,
    read_vector,
)
from urbanprofile.data.loaders.built import MAX_DENSE_PATTERN_CELLS, check_output, patterns_view, write_built
from urbanprofile.data.osm import OSM_CATEGORIES, is_osm_extract, osm_extent, read_osm_landuse, read_osm_pois
from urbanprofile.errors import DataError, UrbanProfileError, require

if TYPE_CHECKING:
    import geopandas as gpd

#: The category that POIs of unknown category are counted under.
OTHER = "other"
#: Spatial join engines; ``auto`` picks :data:`DEFAULT_ENGINE` (the faster one in ``benchmarks/build_city.py``).
JOIN_ENGINES = ("auto", "geopandas", "duckdb")
DEFAULT_ENGINE = "geopandas"
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
LABEL_AGGREGATIONS = ("mean", "sum", "median", "max", "min")
#: Default cap on the H3 cells a build may cut (``--max-cells``): a typo in ``--h3-res`` stops with the estimate
#: instead of running for an hour and filling the disk.
DEFAULT_MAX_CELLS = 200_000
#: Regions overlapping by more than this share of the smaller one are an error (a point counts in one only).
OVERLAP_ERROR = 0.5
_CITY_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


# -- what to build and what happened ---------------------------------------------------------------
@dataclass
class BuildSpec:
    """Inputs of a build: files, the columns to read and how to join them.

    Attributes:
        city: Short lowercase name (``[a-z0-9_-]``); the dataset is called ``built-<city>``.
        regions: Region polygons (GeoParquet, GeoJSON, GeoPackage, shapefile), or ``None`` with ``boundary``.
        region_id_column: Field holding region ids (default ``region_id`` when present, else 0..N-1).
        region_name_column: Field holding a human-readable region name (shown on maps).
        boundary: A city boundary (vector file, ``.osm.pbf`` extract, or ``W,S,E,N`` in degrees) cut into H3 cells.
        h3_resolution: H3 resolution (0-15) of the cells cut from ``boundary``.
        h3_cover: Keep every cell overlapping the boundary (default), else only cells whose centre is inside.
        pois: POI points (GeoParquet, GeoJSON, GeoPackage, shapefile, CSV/Parquet with lon/lat, ``.osm.pbf``).
        category_column: Field holding the POI category (``category`` by default).
        categories: Category list (others count as ``other``), or a mapping ``{category: [raw values]}``
            (``key=*`` matches every value of an OSM key), or a JSON file holding either; ``None``: every value
            found (for an OSM extract: the broad classes of :data:`OSM_CATEGORIES`).
        lon_column, lat_column: Coordinate columns of CSV/Parquet point tables.
        landuse: Land-use polygons with a class field (or an ``.osm.pbf`` extract).
        landuse_class_column: Field holding the land-use class.
        trips: A CSV/Parquet table of trips: origin/destination region ids, or coordinates of both ends under
            the names public trip tables use (see :func:`trip_columns`).
        trip_columns: Two id columns or four coordinate columns, when not the default names.
        trip_time_column: Departure time (datetime or hour of day) that splits trips into time patterns.
        trip_weight_column: Number of trips each row stands for (default: a column named like ``trips``,
            ``count``, ``n``, ``weight`` or ``flow`` when there is exactly one; else, or with ``"none"``, every
            row is one trip).
        n_time_patterns: Equal time-of-day bins of the patterns.
        labels: A CSV/Parquet table keyed by region id, or points with values aggregated per region; with
            ``label_columns`` and no ``labels``, fields of the regions file are the labels.
        label_id_column: Region-id column of a labels table.
        label_columns: Indicator columns (default: every numeric column but the id).
        label_agg: How point values are aggregated per region.
        crs: CRS of inputs that declare none (and of CSV coordinates); required for such files.
        join_engine: ``geopandas`` (sjoin), ``duckdb`` (spatial extension) or ``auto``.
        max_cells: Most H3 cells a boundary may be cut into (the estimate is checked before cutting).
    """

    city: str
    regions: Path | None = None
    region_id_column: str | None = None
    region_name_column: str | None = None
    boundary: str | None = None
    h3_resolution: int | None = None
    h3_cover: bool = True
    pois: Path | None = None
    category_column: str | None = None
    categories: list[str] | dict[str, list[str]] | str | None = None
    lon_column: str = "lon"
    lat_column: str = "lat"
    landuse: Path | None = None
    landuse_class_column: str = "class"
    trips: Path | None = None
    trip_columns: list[str] | None = None
    trip_time_column: str | None = None
    trip_weight_column: str | None = None
    n_time_patterns: int = 4
    labels: Path | None = None
    label_id_column: str = "region_id"
    label_columns: list[str] | None = None
    label_agg: str = "mean"
    crs: str | None = None
    join_engine: str = "auto"
    max_cells: int = DEFAULT_MAX_CELLS

    def check(self) -> None:
        """Raise a one-line error for an inconsistent spec, before any file is read."""
        if not _CITY_NAME.match(self.city):
            raise UrbanProfileError(f"city name {self.city!r} must be lowercase letters, digits, '-' or '_'")
        if (self.regions is None) == (self.boundary is None):
            raise UrbanProfileError("give either --regions (polygons) or --boundary with --h3-res (H3 cells)")
        if self.boundary is not None and self.h3_resolution is None:
            raise UrbanProfileError("--boundary needs --h3-res (H3 resolution 0-15)")
        if self.h3_resolution is not None and not 0 <= self.h3_resolution <= 15:
            raise UrbanProfileError(f"--h3-res must be in 0..15, got {self.h3_resolution}")
        if self.join_engine not in JOIN_ENGINES:
            raise UrbanProfileError(f"unknown join engine {self.join_engine!r}; valid: {', '.join(JOIN_ENGINES)}")
        if self.label_agg not in LABEL_AGGREGATIONS:
            valid = ", ".join(LABEL_AGGREGATIONS)
            raise UrbanProfileError(f"unknown label aggregation {self.label_agg!r}; valid: {valid}")
        if self.max_cells < 1:
            raise UrbanProfileError(f"--max-cells must be >= 1, got {self.max_cells}")
        if self.n_time_patterns < 1:
            raise UrbanProfileError(f"n_time_patterns must be >= 1, got {self.n_time_patterns}")
        if self.trip_columns is not None and len(self.trip_columns) not in (2, 4):
            raise UrbanProfileError("--trip-columns takes 2 region-id columns or 4 coordinate columns "
                                    f"(o_lon,o_lat,d_lon,d_lat), got {len(self.trip_columns)}")
        for path in (self.regions, self.pois, self.landuse, self.trips, self.labels):
            if path is not None and not Path(path).exists():
                raise DataError(f"{path}: file not found")

    @property
    def engine(self) -> str:
        return DEFAULT_ENGINE if self.join_engine == "auto" else self.join_engine


@dataclass
class BuildReport:
    """What a build did: counts of what was read, joined, dropped or repaired, and step timings."""

    city: str
    region_kind: str = ""
    n_regions: int = 0
    n_geometries_repaired: int = 0
    join_engine: str = ""
    n_pois_read: int = 0
    n_pois_missing_location: int = 0
    n_pois_malformed: int = 0
    n_pois_unreadable: int = 0
    unreadable_example: str = ""
    n_pois_joined: int = 0
    n_pois_outside: int = 0
    n_pois_unknown_category: int = 0
    unknown_categories: dict[str, int] = field(default_factory=dict)
    n_categories: int = 0
    n_landuse_polygons: int = 0
    n_landuse_classes: int = 0
    n_landuse_dropped: int = 0
    landuse_dropped: dict[str, int] = field(default_factory=dict)
    n_region_overlaps: int = 0
    region_overlap_example: str = ""
    h3_cells_estimate: int = 0
    n_trips_read: int = 0
    n_trips_missing: int = 0
    n_trips_outside: int = 0
    n_trips_kept: int = 0
    n_trips_malformed: int = 0
    n_trips_unreadable: int = 0
    trip_weight_column: str = ""
    trips_weighted_read: float = 0.0
    trips_weighted_kept: float = 0.0
    trip_columns: list[str] = field(default_factory=list)
    n_time_patterns: int = 0
    n_label_rows: int = 0
    n_label_rows_unmatched: int = 0
    n_label_rows_no_id: int = 0
    label_values_missing: dict[str, int] = field(default_factory=dict)
    label_columns_skipped: list[str] = field(default_factory=list)
    n_regions_unlabelled: int = 0
    tasks: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    output: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def warnings(self) -> list[str]:
        """One line per thing the user should know was dropped, remapped or repaired."""
        top = ", ".join(f"{k} ({v})" for k, v in list(self.unknown_categories.items())[:5])
        landuse_top = ", ".join(f"{k} ({v})" for k, v in list(self.landuse_dropped.items())[:5])
        checks = [
            (self.n_geometries_repaired, "invalid region geometries repaired (make_valid)"),
            (self.n_region_overlaps, f"pairs of regions overlap ({self.region_overlap_example}); a point in an "
                                     "overlap is counted in the first region only"),
            (self.n_pois_malformed, "POI rows with the wrong number of fields (parse errors) dropped"),
            (self.n_pois_unreadable, f"POIs with coordinates that are not numbers dropped ({self.unreadable_example})"),
            (self.n_pois_missing_location, "POIs without a location (empty coordinates) dropped"),
            (self.n_pois_outside, f"of {self.n_pois_read} POIs lie outside every region (not counted)"),
            (self.n_pois_unknown_category, f"POIs of unknown category counted as {OTHER!r}: {top}"),
            (self.n_landuse_dropped, f"land-use polygons with tags that are not land-use classes dropped: "
                                     f"{landuse_top}"),
            (self.n_trips_malformed, "trip rows with the wrong number of fields (parse errors) dropped"),
            (self.n_trips_unreadable, "trips with coordinates or ids that are not readable dropped"),
            (self.n_trips_missing, "trips with a missing origin or destination dropped"),
            (self.n_trips_outside, "trips starting or ending outside every region dropped"),
            (self.n_label_rows_no_id, "label rows have no region id (ignored)"),
            (self.n_label_rows_unmatched, "label rows match no region (ignored)"),
            (self.n_regions_unlabelled, "regions have no label (left missing)"),
            *((n, f"values of label {task!r} are missing (empty, NA, n/a, null; left missing)")
              for task, n in self.label_values_missing.items()),
        ]
        lines = [f"{count} {what}" for count, what in checks if count]
        if self.label_columns_skipped:
            lines.append(f"columns without numbers are not labels (name them with --label-columns to use them): "
                         f"{', '.join(self.label_columns_skipped)}")
        return lines


@dataclass
class BuiltCity:
    """The result of :func:`build_city`: the city in memory, its report, and what the folder needs."""

    city: CityData
    report: BuildReport
    sources: dict[str, Any]
    od_pattern_rows: pd.DataFrame | None = None


# -- regions -----------------------------------------------------------------------------------------
def region_ids(values: pd.Series) -> pd.Index:
    """Region ids as clean values: integral floats (``28801.0``) become ints, text is stripped.

    Text stays text: a code such as ``01000`` keeps its leading zero (it is not the number 1000).
    """
    if pd.api.types.is_bool_dtype(values):
        return pd.Index(values.astype(str), name="region_id")
    if pd.api.types.is_numeric_dtype(values):
        numbers = values.to_numpy(dtype=float)
        if np.isfinite(numbers).all() and (numbers == np.round(numbers)).all():
            return pd.Index(numbers.astype(np.int64), name="region_id")
    return pd.Index(values.astype(str).str.strip(), name="region_id")


def missing_ids(values: pd.Series) -> np.ndarray:
    """Which ids are missing: null, or text that is empty or an NA token (``NA``, ``null``, ...)."""
    text = values.astype(object).where(values.notna(), "").astype(str).str.strip().str.lower()
    return np.asarray(values.isna().to_numpy() | text.isin(NA_TOKENS).to_numpy())


_INTEGRAL_TEXT = re.compile(r"^(-?\d+)\.0*$")


def _id_keys(values: pd.Series | pd.Index) -> pd.Index:
    """Ids as text for matching across files (``12``, ``12.0`` and ``"12"`` are the same region; ``"012"`` is
    not, as codes keep their leading zeros)."""
    keys = pd.Series(region_ids(pd.Series(values)).astype(str))
    return pd.Index(keys.str.replace(_INTEGRAL_TEXT, r"\1", regex=True))


def _polygonal(geom: Any) -> Any:
    """The polygonal part of a (repaired) geometry, or ``None``."""
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    if geom is None or geom.is_empty:
        return None
    if isinstance(geom, Polygon | MultiPolygon):
        return geom
    parts = [p for p in shapely.get_parts(geom) if isinstance(p, Polygon | MultiPolygon) and not p.is_empty]
    return shapely.union_all(parts) if parts else None


def repair_polygons(geoms: gpd.GeoSeries, where: str, ids: pd.Index) -> tuple[gpd.GeoSeries, int]:
    """Repair invalid polygons with ``make_valid`` (keeping the polygonal part); report what cannot be used."""
    geoms = geoms.copy()
    invalid = geoms.notna() & ~geoms.is_valid
    if invalid.any():
        geoms[invalid] = geoms[invalid].make_valid().map(_polygonal)
    for i, geom in enumerate(geoms):
        if geom is None or geom.is_empty:
            raise DataError(f"{where}: region {ids[i]!r} has an empty geometry")
        if geom.geom_type not in ("Polygon", "MultiPolygon"):
            raise DataError(f"{where}: region {ids[i]!r} is a {geom.geom_type}, regions must be polygons")
    return geoms, int(invalid.sum())


def regions_from_file(
    path: Path, id_column: str | None = None, name_column: str | None = None, crs: str | None = None
) -> tuple[gpd.GeoDataFrame, pd.DataFrame, int]:
    """Read region polygons into the CityData layout (EPSG:4326, indexed by ``region_id``).

    Returns:
        The regions (``name`` when a name column is given, ``lon``/``lat`` centroids, ``geometry``), their
        other attributes (indexed the same way, usable as labels) and the number of repaired geometries.
    """
    import geopandas as gpd

    frame = read_vector(path, crs)
    if len(frame) == 0:
        raise DataError(f"{path}: holds no regions")
    column = id_column or ("region_id" if "region_id" in frame.columns else None)
    if column is not None and column not in frame.columns:
        raise DataError(f"{path}: no field {column!r} for region ids (fields: {_listed(frame.columns)})")
    if column is not None and missing_ids(frame[column]).any():
        rows = np.flatnonzero(missing_ids(frame[column]))
        raise DataError(f"{path}: {len(rows)} regions have no id in field {column!r} (first: feature {rows[0] + 1})")
    ids = region_ids(frame[column]) if column else pd.Index(np.arange(len(frame)), name="region_id")
    if ids.has_duplicates:
        raise DataError(f"{path}: duplicate region ids in {column!r}: {_few(ids[ids.duplicated()])}")
    if name_column is not None and name_column not in frame.columns:
        raise DataError(f"{path}: no field {name_column!r} for region names (fields: {_listed(frame.columns)})")
    geoms, repaired = repair_polygons(frame.geometry.reset_index(drop=True), str(path), ids)
    regions = gpd.GeoDataFrame(index=ids, geometry=geoms.to_numpy(), crs="EPSG:4326")
    if name_column is not None:
        regions.insert(0, "name", frame[name_column].astype(str).to_numpy())
    regions["lon"], regions["lat"] = centroid_lonlat(regions.geometry)
    regions = regions[[*(["name"] if name_column else []), "lon", "lat", "geometry"]]
    regions.attrs["overlaps"] = region_overlaps(regions, str(path))
    attributes = pd.DataFrame(frame.drop(columns=frame.geometry.name).to_numpy(), index=ids,
                              columns=[c for c in frame.columns if c != frame.geometry.name])
    return regions, attributes, repaired


def region_overlaps(regions: gpd.GeoDataFrame, where: str) -> tuple[int, str]:
    """Pairs of regions whose areas overlap (shared borders do not count).

    Returns:
        The number of overlapping pairs and the largest overlap, described.

    Raises:
        DataError: If two regions overlap by more than :data:`OVERLAP_ERROR` of the smaller one: every point in
            the overlap would be counted in the first region only, silently emptying the other.
    """
    import shapely

    geoms = regions.geometry.to_numpy()
    left, right = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    pair = left < right
    left, right = left[pair], right[pair]
    if not len(left):
        return 0, ""
    shared = shapely.area(shapely.intersection(geoms[left], geoms[right]))
    smaller = np.minimum(shapely.area(geoms[left]), shapely.area(geoms[right]))
    share = np.divide(shared, smaller, out=np.zeros_like(shared), where=smaller > 0)
    overlapping = share > 1e-6  # touching borders leave a numerically zero intersection
    if not overlapping.any():
        return 0, ""
    worst = int(np.argmax(share))
    a, b = regions.index[left[worst]], regions.index[right[worst]]
    described = f"regions {a!r} and {b!r} share {share[worst]:.0%} of the smaller one"
    if share[worst] > OVERLAP_ERROR:
        raise DataError(f"{where}: {described}; points there would all count in {a!r} only "
                        "(regions must not overlap: fix or dissolve them)")
    return int(overlapping.sum()), described


def read_boundary(spec: str, crs: str | None = None) -> gpd.GeoDataFrame:
    """A boundary from a vector file, the extent of an ``.osm.pbf`` extract, or ``W,S,E,N`` degrees."""
    import geopandas as gpd
    from shapely.geometry import box

    parts = spec.split(",")
    if len(parts) == 4:
        try:
            west, south, east, north = (float(p) for p in parts)
        except ValueError:
            pass
        else:
            if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
                raise DataError(f"boundary {spec!r}: expected W,S,E,N in degrees with W < E and S < N")
            return gpd.GeoDataFrame(geometry=[box(west, south, east, north)], crs="EPSG:4326")
    path = Path(spec)
    if is_osm_extract(path):
        return osm_extent(path)
    frame = read_vector(path, crs)
    polygons = frame[frame.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]
    if polygons.empty:
        raise DataError(f"{path}: the boundary holds no polygon")
    return polygons


def h3_cell_estimate(boundary: gpd.GeoDataFrame, resolution: int, cover: bool = True) -> int:
    """About how many H3 cells of ``resolution`` a boundary is cut into (its area over the mean cell area, plus a
    ring of border cells when covering), computed without cutting."""
    h3 = require("h3", "build")
    shape = boundary.to_crs("EPSG:4326").geometry.make_valid().union_all()
    if shape.is_empty:
        return 0
    import geopandas as gpd

    equal_area = gpd.GeoSeries([shape], crs="EPSG:4326").to_crs("EPSG:6933")  # world equal-area, metres
    area_km2 = float(equal_area.area.iloc[0]) / 1e6
    border_km = float(equal_area.length.iloc[0]) / 1e3
    cells = area_km2 / h3.average_hexagon_area(resolution, "km^2")
    if cover:
        cells += border_km / h3.average_hexagon_edge_length(resolution, "km")  # about one cell per edge length
    return max(1, math.ceil(cells))


def h3_regions(
    boundary: gpd.GeoDataFrame, resolution: int, cover: bool = True, max_cells: int | None = None,
    where: str = "the boundary",
) -> gpd.GeoDataFrame:
    """Cut a boundary into H3 cells; region ids are H3 cell strings.

    Args:
        boundary: Polygons in any CRS.
        resolution: H3 resolution (0-15).
        cover: Keep every cell that overlaps the boundary (nothing inside is left out, as srai's buffered
            H3 regionalizer); ``False`` keeps only cells whose centre lies inside.
        max_cells: Refuse (before cutting) a boundary estimated at more cells than this.
        where: The boundary's name in messages.

    Raises:
        DataError: The estimate exceeds ``max_cells`` (the message says how to raise it), or no cell is left.
    """
    import geopandas as gpd
    from shapely.geometry import Polygon

    h3 = require("h3", "build")
    if max_cells is not None:
        estimate = h3_cell_estimate(boundary, resolution, cover)
        if estimate > max_cells:
            raise DataError(f"{where}: about {estimate:,} H3 cells at resolution {resolution}, more than "
                            f"--max-cells {max_cells:,}; use a coarser --h3-res, or raise --max-cells if you "
                            "mean it")
    shape = boundary.to_crs("EPSG:4326").geometry.make_valid().union_all()
    cells = set(h3.geo_to_cells(shape, resolution)) if not shape.is_empty else set()

    def polygon(cell: str) -> Polygon:
        return Polygon([(lng, lat) for lat, lng in h3.cell_to_boundary(cell)])

    if cover and not shape.is_empty:
        if not cells:  # a boundary smaller than one cell
            point = shape.representative_point()
            cells = {h3.latlng_to_cell(point.y, point.x, resolution)}
        frontier = set(cells)
        while frontier:  # grow outwards while neighbouring cells still overlap the boundary
            ring = {n for c in frontier for n in h3.grid_disk(c, 1)} - cells
            frontier = {c for c in ring if polygon(c).intersects(shape)}
            cells |= frontier
    if not cells:
        raise DataError(f"the boundary holds no H3 cell centre at resolution {resolution} (try a finer --h3-res)")
    ordered = sorted(cells)
    polygons = [polygon(c) for c in ordered]
    centres = np.array([h3.cell_to_latlng(c) for c in ordered])
    ids = pd.Index(ordered, name="region_id", dtype=str)
    return gpd.GeoDataFrame({"lon": centres[:, 1], "lat": centres[:, 0]}, index=ids, geometry=polygons,
                            crs="EPSG:4326")


# -- points and the spatial join ---------------------------------------------------------------------
def _xy_to_lonlat(x: np.ndarray, y: np.ndarray, crs: str | None, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of a plain table as lon/lat: reprojected from ``crs``, else checked to be degrees."""
    if crs is not None:
        from pyproj import Transformer
        from pyproj.exceptions import CRSError

        try:
            transformer = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
        except CRSError as err:
            raise DataError(f"--crs {crs!r} is not a CRS pyproj knows ({err})") from None
        lon, lat = transformer.transform(x, y)
        return np.asarray(lon, dtype=float), np.asarray(lat, dtype=float)
    finite = np.isfinite(x) & np.isfinite(y)
    if (np.abs(x[finite]) > 180).any() or (np.abs(y[finite]) > 90).any():
        raise DataError(f"{where}: coordinates are not lon/lat degrees; pass the CRS they are in (--crs EPSG:...)")
    return x, y


def _has_geo_metadata(path: Path) -> bool:
    if path.suffix.lower() != ".parquet":
        return True
    import pyarrow.parquet as pq

    try:
        return b"geo" in (pq.read_schema(path).metadata or {})
    except Exception as err:  # a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({first_line(err)})") from None


@dataclass
class PointTable:
    """Points read from a file, and what could not be read.

    Attributes:
        frame: The points with a location: ``lon``/``lat`` degrees and the file's other columns.
        path: The file.
        unit: What a row is called in messages (``line``, ``row``, ``feature``).
        numbers: Each row's line, row or feature number in the file.
        n_missing: Rows without a location (empty coordinates, no geometry), dropped.
        n_malformed: CSV rows with the wrong number of fields, dropped.
        n_unreadable: Rows whose coordinates are not numbers, dropped; ``example`` shows the first.
    """

    frame: pd.DataFrame
    path: Path
    unit: str
    numbers: np.ndarray
    n_missing: int = 0
    n_malformed: int = 0
    n_unreadable: int = 0
    example: str = ""

    def where(self, row: int) -> str:
        """``pois.csv line 7``: where row position ``row`` of ``frame`` is in the file."""
        return f"{self.path} {self.unit} {int(self.numbers[row])}"

    @property
    def n_rows(self) -> int:
        return len(self.frame) + self.n_missing + self.n_malformed + self.n_unreadable


def read_points(path: Path, crs: str | None = None, lon_column: str = "lon", lat_column: str = "lat") -> PointTable:
    """Read points as a table with ``lon``/``lat`` degrees and the file's other columns.

    Vector files are reprojected to EPSG:4326 (lines and polygons become their representative point);
    CSV and plain Parquet tables need ``lon_column``/``lat_column`` (CSV cells are read as text, so that
    coordinates that are not numbers are told apart from empty ones). ``.osm.pbf`` extracts give POIs with
    their ``key=value`` tag in ``category``.
    """
    if is_osm_extract(path):
        frame: pd.DataFrame = read_osm_pois(path)
    elif path.suffix.lower() in (".csv", ".tsv", ".txt") or not _has_geo_metadata(path):
        raw = read_raw_table(path)
        table = raw.frame
        missing = [c for c in (lon_column, lat_column) if c not in table.columns]
        if missing:
            raise DataError(
                f"{path}: no column {missing[0]!r} for point coordinates (columns: {_listed(table.columns)})")
        x, _, x_bad = parse_numbers(table[lon_column])
        y, _, y_bad = parse_numbers(table[lat_column])
        unreadable = x_bad | y_bad
        example = ""
        if unreadable.any():
            row = int(np.argmax(unreadable))
            column, value = (lon_column, table[lon_column].iloc[row]) if x_bad[row] else \
                (lat_column, table[lat_column].iloc[row])
            example = f"first: {raw.where(row)} {column}={str(value)!r}"
        lon, lat = _xy_to_lonlat(x, y, crs, str(path))
        keep = np.isfinite(lon) & np.isfinite(lat)
        located = table.drop(columns=[lon_column, lat_column]).assign(lon=lon, lat=lat)[keep].reset_index(drop=True)
        n_unreadable = int((unreadable & ~keep).sum())
        return PointTable(located, path, "line" if raw.is_text else "row", raw.lines[keep],
                          n_missing=int((~keep).sum()) - n_unreadable, n_malformed=len(raw.malformed),
                          n_unreadable=n_unreadable, example=example)
    else:
        frame = read_vector(path, crs)
    geoms = frame.geometry
    located_mask = geoms.notna() & ~geoms.is_empty
    geoms = geoms[located_mask]
    points = geoms.where(geoms.geom_type == "Point", geoms.representative_point())
    table = pd.DataFrame(frame[located_mask].drop(columns=frame.geometry.name))
    table["lon"] = points.x.to_numpy()
    table["lat"] = points.y.to_numpy()
    numbers = np.flatnonzero(located_mask.to_numpy()) + 1
    return PointTable(table.reset_index(drop=True), path, "feature", numbers, n_missing=int((~located_mask).sum()))


def spatial_extension_path() -> str:
    """The DuckDB spatial extension shipped by ``duckdb-extension-spatial`` (loaded offline, never downloaded)."""
    duckdb = require("duckdb", "build")
    package = require("duckdb_extension_spatial", "build")
    shipped = Path(str(package.__file__)).parent / "extensions"
    path = shipped / f"v{duckdb.__version__}" / "spatial.duckdb_extension"
    if not path.is_file():
        found = sorted(p.name for p in shipped.glob("v*"))
        raise UrbanProfileError(
            f"duckdb-extension-spatial ships {', '.join(found) or 'no extension'} but duckdb is "
            f"{duckdb.__version__}: pip install 'urbanprofile[build]'"
        )
    return str(path)


def assign_points(lon: np.ndarray, lat: np.ndarray, regions: gpd.GeoDataFrame, engine: str = "auto") -> np.ndarray:
    """The position (0..N-1) of the region each point falls in, or -1 outside every region.

    A point on a shared border goes to the first region in ``regions`` order, with either engine.

    Args:
        lon, lat: Point coordinates in degrees.
        regions: Polygons in EPSG:4326.
        engine: ``geopandas`` (``sjoin``), ``duckdb`` (spatial extension) or ``auto``.
    """
    engine = DEFAULT_ENGINE if engine == "auto" else engine
    if engine == "geopandas":
        return _assign_geopandas(lon, lat, regions)
    if engine == "duckdb":
        return _assign_duckdb(lon, lat, regions)
    raise UrbanProfileError(f"unknown join engine {engine!r}; valid: {', '.join(JOIN_ENGINES)}")


def _assign_geopandas(lon: np.ndarray, lat: np.ndarray, regions: gpd.GeoDataFrame) -> np.ndarray:
    import geopandas as gpd

    points = gpd.GeoDataFrame(geometry=gpd.points_from_xy(lon, lat), crs="EPSG:4326")
    polygons = gpd.GeoDataFrame({"position": np.arange(len(regions))}, geometry=regions.geometry.to_numpy(),
                                crs="EPSG:4326")
    joined = gpd.sjoin(points, polygons, how="inner", predicate="intersects")
    first = joined.groupby(level=0)["position"].min()
    out = np.full(len(lon), -1, dtype=np.int64)
    out[first.index.to_numpy()] = first.to_numpy()
    return out


def _assign_duckdb(lon: np.ndarray, lat: np.ndarray, regions: gpd.GeoDataFrame) -> np.ndarray:
    import pyarrow as pa
    import shapely

    duckdb = require("duckdb", "build")
    extension = spatial_extension_path()
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    try:
        con.execute(f"LOAD '{extension}'")
        points = pa.table({"pid": np.arange(len(lon)), "lon": lon, "lat": lat})
        polygons = pa.table({"position": np.arange(len(regions)),
                             "wkb": shapely.to_wkb(regions.geometry.to_numpy())})
        con.register("points_in", points)
        con.register("polygons_in", polygons)
        con.execute("CREATE TEMP TABLE polygons AS SELECT position, ST_GeomFromWKB(wkb) AS geom FROM polygons_in")
        con.execute("CREATE TEMP TABLE points AS SELECT pid, ST_Point(lon, lat) AS geom FROM points_in")
        result = con.execute(
            "SELECT p.pid, min(r.position) FROM points p JOIN polygons r ON ST_Intersects(r.geom, p.geom) "
            "GROUP BY p.pid"
        ).fetchnumpy()
    finally:
        con.close()
    out = np.full(len(lon), -1, dtype=np.int64)
    keys = list(result)
    out[np.asarray(result[keys[0]], dtype=np.int64)] = np.asarray(result[keys[1]], dtype=np.int64)
    return out


def map_categories(
    raw: pd.Series, categories: list[str] | dict[str, list[str]] | None
) -> tuple[np.ndarray, list[str], dict[str, int]]:
    """Map raw category values onto a category list; anything else counts as ``other``.

    Args:
        raw: Raw values (e.g. ``restaurant`` or, for OSM, ``amenity=restaurant``).
        categories: ``None`` (every value found is a category), a list of categories, or a mapping
            ``{category: [raw values]}`` where ``key=*`` matches any ``key=value``.

    Returns:
        Category codes per point, the category names (``other`` last), and unknown raw values with counts
        (most frequent first; missing values as ``<missing>``).
    """
    values = raw.astype("string")
    if categories is None:
        names = sorted(str(v) for v in values.dropna().unique())
        mapped = values
    elif isinstance(categories, dict):
        names = [str(k) for k in categories]
        exact = {str(v): str(k) for k, vs in categories.items() for v in vs if not str(v).endswith("=*")}
        exact.update({n: n for n in names})
        wildcard = {str(v)[:-2]: str(k) for k, vs in categories.items() for v in vs if str(v).endswith("=*")}
        mapped = values.map(exact)
        key = values.str.split("=", n=1).str[0]
        mapped = mapped.fillna(key.map(wildcard))
    else:
        names = [str(c) for c in categories]
        mapped = values.where(values.isin(names))
    unknown = mapped.isna()
    counts = values[unknown].fillna("<missing>").value_counts()
    all_names = [*(n for n in names if n != OTHER), OTHER]
    codes = pd.Categorical(mapped.fillna(OTHER).astype(str), categories=all_names).codes
    return np.asarray(codes), all_names, {str(k): int(v) for k, v in counts.items()}


def _span(lon: np.ndarray, lat: np.ndarray) -> str:
    return f"lon {np.nanmin(lon):.4g}..{np.nanmax(lon):.4g}, lat {np.nanmin(lat):.4g}..{np.nanmax(lat):.4g}"


def check_points_inside(
    lon: np.ndarray, lat: np.ndarray, position: np.ndarray, regions: gpd.GeoDataFrame, engine: str, where: str,
    what: str = "POIs", swap_hint: str = "",
) -> None:
    """Refuse points that miss the regions: none inside (the view would be all zeros), or most of them outside
    while most would be inside with longitude and latitude swapped (the columns are swapped).

    Raises:
        DataError: Naming the file, how many points lie inside, and the extents (or the swap).
    """
    n = len(lon)
    if n == 0:
        raise DataError(f"{where}: no {what} with a location")
    inside = int((position >= 0).sum())
    if inside >= n / 2:
        return
    swapped = int((assign_points(lat, lon, regions, engine) >= 0).sum()) if (np.abs(lat) <= 180).all() else 0
    if swapped >= n / 2 and swapped > inside:
        raise DataError(f"{where}: {inside} of {n} {what} lie inside a region, {swapped} would with longitude and "
                        f"latitude swapped: the coordinates look swapped{swap_hint}")
    if inside == 0:
        bounds = regions.total_bounds
        raise DataError(f"{where}: none of the {n} {what} lies inside a region ({what} span {_span(lon, lat)}; "
                        f"regions span {_span(bounds[[0, 2]], bounds[[1, 3]])}): wrong file or CRS?")


def poi_counts(
    points: pd.DataFrame, regions: gpd.GeoDataFrame, category_column: str,
    categories: list[str] | dict[str, list[str]] | None, engine: str, report: BuildReport, where: str = "POIs",
    swap_hint: str = "",
) -> pd.DataFrame:
    """Count POIs per region and category (the ``poi_counts`` view); fills the POI figures of ``report``.

    Raises:
        DataError: No POI lies inside a region, or the coordinates look swapped (see :func:`check_points_inside`).
    """
    if category_column not in points.columns:
        raise DataError(f"{where}: no column {category_column!r} for POI categories "
                        f"(columns: {_listed(c for c in points.columns if c not in ('lon', 'lat'))})")
    codes, names, unknown = map_categories(points[category_column], categories)
    lon, lat = points["lon"].to_numpy(float), points["lat"].to_numpy(float)
    position = assign_points(lon, lat, regions, engine)
    check_points_inside(lon, lat, position, regions, engine, where, "POIs", swap_hint)
    inside = position >= 0
    counts = np.zeros((len(regions), len(names)), dtype=np.int64)
    np.add.at(counts, (position[inside], codes[inside]), 1)
    report.n_pois_read += len(points)
    report.n_pois_joined = int(inside.sum())
    report.n_pois_outside = int((~inside).sum())
    report.n_pois_unknown_category = int(sum(unknown.values()))
    report.unknown_categories = dict(list(unknown.items())[:20])
    report.n_categories = len(names)
    return frame_from_array(counts, regions.index, names)


# -- land use ----------------------------------------------------------------------------------------
def landuse_shares(
    regions: gpd.GeoDataFrame, landuse: gpd.GeoDataFrame, class_column: str, utm: Any = None
) -> pd.DataFrame:
    """Share of each region's area covered by each land-use class (overlay in the local UTM zone).

    ``utm`` fixes the projected CRS (default: the regions' UTM zone), so that a part of the regions gives the
    shares the whole city gives.
    """
    import geopandas as gpd

    utm = regions.estimate_utm_crs() if utm is None else utm
    cells = gpd.GeoDataFrame({"position": np.arange(len(regions))}, geometry=regions.geometry.to_numpy(),
                             crs="EPSG:4326").to_crs(utm)
    parcels = landuse[[class_column, landuse.geometry.name]].to_crs(utm)
    parcels = parcels.assign(**{class_column: parcels[class_column].astype(str)})
    pieces = gpd.overlay(cells, parcels, how="intersection", keep_geom_type=True)
    classes = sorted(parcels[class_column].unique())
    area = pd.DataFrame({"position": pieces["position"], "cls": pieces[class_column], "area": pieces.area})
    table = area.pivot_table(index="position", columns="cls", values="area", aggfunc="sum", fill_value=0.0)
    table = table.reindex(index=range(len(regions)), columns=classes, fill_value=0.0)
    shares = table.to_numpy() / cells.area.to_numpy()[:, None]
    return frame_from_array(np.clip(shares, 0.0, None), regions.index, classes)


def read_landuse(
    path: Path, class_column: str, crs: str | None, report: BuildReport | None = None
) -> gpd.GeoDataFrame:
    """Land-use polygons with a class field, repaired when invalid.

    An ``.osm.pbf`` extract's tags are cleaned into the classes of
    :data:`urbanprofile.data.osm.OSM_LANDUSE_CLASSES`; the tags dropped are counted in ``report``.
    """
    if is_osm_extract(path):
        landuse, dropped = read_osm_landuse(path)
        if report is not None:
            report.n_landuse_dropped = sum(dropped.values())
            report.landuse_dropped = dict(list(dropped.items())[:20])
        return landuse.rename(columns={"class": class_column})
    frame = read_vector(path, crs)
    if class_column not in frame.columns:
        raise DataError(f"{path}: no field {class_column!r} for land-use classes (fields: {_listed(frame.columns)})")
    frame = frame[frame.geometry.notna() & frame.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]
    if frame.empty:
        raise DataError(f"{path}: holds no land-use polygons")
    invalid = ~frame.geometry.is_valid
    if invalid.any():
        frame = frame.assign(geometry=frame.geometry.make_valid().map(_polygonal)).dropna(subset=["geometry"])
    return frame[frame[class_column].notna()]


# -- trips -------------------------------------------------------------------------------------------
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
                    f"{_listed(names)}")


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

    ``assign`` joins trip ends (lon, lat) to region positions like :func:`assign_points` (default: that
    function, in this process).

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
        raise DataError(f"{where}: no column {missing[0]!r} (columns: {_listed(table.columns)})")
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
        keys = pd.Series(np.arange(n), index=_id_keys(regions.index))
        ends = []
        present = ~missing_ids(table[columns[0]]) & ~missing_ids(table[columns[1]])
        for column in columns:
            found = keys.reindex(_id_keys(table[column].where(present, "")).to_numpy())
            ends.append(np.where(present, found.fillna(-1).to_numpy(dtype=np.int64), -1))
        origin, dest = ends
    else:
        parsed = [parse_numbers(table[c]) for c in columns]
        xy = [numbers for numbers, _, _ in parsed]
        unreadable = np.any([bad for _, _, bad in parsed], axis=0)
        present = np.isfinite(np.column_stack(xy)).all(axis=1)
        o_lon, o_lat = _xy_to_lonlat(xy[0], xy[1], spec.crs, where)
        d_lon, d_lat = _xy_to_lonlat(xy[2], xy[3], spec.crs, where)
        keep = present
        ends_lon, ends_lat = np.concatenate([o_lon[keep], d_lon[keep]]), np.concatenate([o_lat[keep], d_lat[keep]])
        both = (assign_points(ends_lon, ends_lat, regions, spec.engine) if assign is None
                else assign(ends_lon, ends_lat))
        origin = np.full(len(table), -1, dtype=np.int64)
        dest = np.full(len(table), -1, dtype=np.int64)
        origin[keep], dest[keep] = both[: keep.sum()], both[keep.sum():]
        if keep.any() and not ((origin >= 0) & (dest >= 0)).any():  # say why: swapped, or somewhere else
            check_points_inside(o_lon[keep], o_lat[keep], origin[keep], regions, spec.engine, where, "trip origins",
                                " (name the columns in o_lon,o_lat,d_lon,d_lat order with --trip-columns)")
    hours = None
    if time_column is not None:
        if time_column not in table.columns:
            raise DataError(f"{where}: no time column {time_column!r} (columns: {_listed(table.columns)})")
        hours = _trip_hours(table[time_column], where, time_column)
    weights = np.ones(len(table))
    if weight_column is not None:
        if weight_column not in table.columns:
            raise DataError(f"{where}: no trip count column {weight_column!r} (columns: {_listed(table.columns)})")
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
        detail = (f"ids {_few(table[columns[0]][present_mask])} vs regions {_few(regions.index)}"
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


# -- labels ------------------------------------------------------------------------------------------
def _numeric_columns(
    table: pd.DataFrame, wanted: list[str] | None, exclude: set[str], where: str, report: BuildReport,
    row_name: Callable[[int], str],
) -> pd.DataFrame:
    """The label columns as floats, read strictly.

    Empty cells and NA tokens (``NA``, ``n/a``, ``null``...) are missing labels, counted per column in
    ``report``; any other value that is not a number (``12,5``) is an error naming its row. Without
    ``wanted``, columns holding no number at all (names, codes with letters) are not labels and are listed in
    ``report``; a label column with no value at all is an error.
    """
    if wanted is not None:
        missing = [c for c in wanted if c not in table.columns]
        if missing:
            raise DataError(f"{where}: no label column {missing[0]!r} (columns: {_listed(table.columns)})")
    candidates = wanted if wanted is not None else [c for c in table.columns if c not in exclude]
    out: dict[str, np.ndarray] = {}
    for column in candidates:
        values = table[column]
        numbers, absent, bad = parse_numbers(values)
        numeric_dtype = pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)
        text = values[bad].astype(str).str.strip()
        looks_numeric = (~absent & ~bad).any() or text.str.fullmatch(r"[+-]?\d+,\d+").any()
        if wanted is None and (absent.all() or (not numeric_dtype and not looks_numeric)):
            report.label_columns_skipped.append(str(column) + (" (empty)" if absent.all() else ""))
            continue
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(f"{row_name(row)}: label {str(column)!r}: {not_a_number(values.iloc[row])} "
                            f"({int(bad.sum())} such values in the column)")
        if np.isinf(numbers).any():
            raise DataError(f"{row_name(int(np.argmax(np.isinf(numbers))))}: label {str(column)!r} is infinite")
        if absent.all():
            raise DataError(f"{where}: label column {str(column)!r} has no value (all {len(values)} are missing)")
        if absent.any():
            report.label_values_missing[str(column)] = int(absent.sum())
        out[str(column)] = numbers
    if not out:
        raise DataError(f"{where}: no numeric label column (columns: {_listed(table.columns)})")
    return pd.DataFrame(out, index=table.index)


def labels_for_regions(
    regions: gpd.GeoDataFrame, attributes: pd.DataFrame | None, spec: BuildSpec, report: BuildReport
) -> pd.DataFrame:
    """Indicator values per region: from a table keyed by region id, from points, or from region fields.

    Raises:
        DataError: A value is not a number (naming its row), a label column is empty or has no value for any
            region, or no label row matches a region.
    """
    ids = regions.index
    if spec.labels is None:
        if attributes is None:
            raise DataError("label columns from the regions file need --regions (H3 cells have no fields)")
        values = _numeric_columns(attributes, spec.label_columns, set(), str(spec.regions), report,
                                  lambda row: f"{spec.regions}, region {ids[row]!r}")
        report.n_label_rows = len(values)
        out = values.set_axis(ids)
    else:
        out = _labels_from_file(Path(spec.labels), regions, spec, report)
    out.index.name = "region_id"
    empty = [c for c in out.columns if out[c].isna().all()]
    if empty:
        raise DataError(f"{spec.labels or spec.regions}: label {empty[0]!r} has no value for any region "
                        "(its values belong to rows that match no region)")
    report.n_regions_unlabelled = int(out.isna().all(axis=1).sum())
    return out


def _labels_from_file(path: Path, regions: gpd.GeoDataFrame, spec: BuildSpec, report: BuildReport) -> pd.DataFrame:
    ids = regions.index
    raw = None
    if path.suffix.lower() in (".csv", ".tsv", ".txt") or not _has_geo_metadata(path):
        raw = read_raw_table(path)
        table = raw.frame
        has_points = {spec.lon_column, spec.lat_column} <= set(table.columns)
        if spec.label_id_column not in table.columns and not has_points:
            raise DataError(f"{path}: no id column {spec.label_id_column!r} (columns: {_listed(table.columns)}; "
                            "use --label-id-column, or give lon/lat columns for point values)")
        if spec.label_id_column not in table.columns:
            raw = None
    if raw is not None:
        if raw.malformed:
            raise DataError(f"{path} line {raw.malformed[0]}: wrong number of fields "
                            f"({len(raw.malformed)} such rows)")
        table = raw.frame
        no_id = missing_ids(table[spec.label_id_column])
        report.n_label_rows_no_id = int(no_id.sum())
        table = table[~no_id]
        keys = _id_keys(table[spec.label_id_column])
        if keys.has_duplicates:
            raise DataError(f"{path}: duplicate region ids {_few(keys[keys.duplicated()])}")
        region_keys = _id_keys(ids)
        matched = keys.isin(region_keys)
        if not matched.any():
            hint = ""
            stripped = pd.Index(keys.str.lstrip("0")).isin(pd.Index(region_keys.str.lstrip("0")))
            if stripped.any():
                hint = "; they would match without leading zeros: write the ids the same way in both files"
            raise DataError(f"{path}: no id in column {spec.label_id_column!r} matches a region "
                            f"(labels have {_few(keys)}; regions have {_few(region_keys)}){hint}")
        lines = raw.lines[~no_id]
        unit = "line" if raw.is_text else "row"
        values = _numeric_columns(table.reset_index(drop=True), spec.label_columns, {spec.label_id_column},
                                  str(path), report, lambda row: f"{path} {unit} {lines[row]}")
        values.index = keys
        report.n_label_rows = len(raw.frame)
        report.n_label_rows_unmatched = int((~matched).sum())
        return values[matched].reindex(region_keys).set_axis(ids)
    points = read_points(path, spec.crs, spec.lon_column, spec.lat_column)
    values = _numeric_columns(points.frame, spec.label_columns, {"lon", "lat"}, str(path), report, points.where)
    lon, lat = points.frame["lon"].to_numpy(float), points.frame["lat"].to_numpy(float)
    position = assign_points(lon, lat, regions, spec.engine)
    inside = position >= 0
    dropped = points.n_rows - len(points.frame)
    report.n_label_rows = points.n_rows
    report.n_label_rows_unmatched = int((~inside).sum()) + dropped
    check_points_inside(lon, lat, position, regions, spec.engine, str(path), "labelled points")
    grouped = values[inside].groupby(position[inside]).agg(spec.label_agg)
    return grouped.reindex(range(len(ids))).set_axis(ids)


# -- the whole build ---------------------------------------------------------------------------------
UNITS = {
    "poi_counts": "POIs per region and category",
    "landuse_counts": "share of the region's area (0-1) per land-use class",
    "od_flows": "trips from origin region (row) to destination region (column)",
    "od_patterns": "trips per time-of-day pattern (equal bins of the day), origin x destination",
}


def _load_categories(value: list[str] | dict[str, list[str]] | str | None) -> list[str] | dict[str, list[str]] | None:
    """Categories from a list, a mapping, or a JSON file holding either."""
    if value is None or isinstance(value, list | dict):
        return value
    path = Path(value)
    loaded = load_json(path)
    if isinstance(loaded, list) and all(isinstance(v, str) for v in loaded):
        return loaded
    if isinstance(loaded, dict) and all(isinstance(v, list) for v in loaded.values()):
        return {str(k): [str(x) for x in v] for k, v in loaded.items()}
    raise DataError(f"{path}: categories must be a JSON list of names or an object {{category: [raw values]}}")


def _source(path: Path | str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        return {"value": str(path)}
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"path": str(file.resolve()), "bytes": file.stat().st_size, "sha256": digest.hexdigest()}


class _Steps:
    """Times each step and, when asked, shows a rich progress bar on stderr."""

    def __init__(self, total: int, show: bool, report: BuildReport, log: Callable[[str], None] | None = None) -> None:
        self.report = report
        self.log_to = log
        self.progress: Any = None
        if show:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self.progress.start()
            self.task = self.progress.add_task("building", total=total)

    @contextmanager
    def step(self, name: str, description: str) -> Iterator[None]:
        if self.progress is not None:
            self.progress.update(self.task, description=description)
        start = time.perf_counter()
        yield
        self.report.seconds[name] = round(time.perf_counter() - start, 3)
        if self.progress is not None:
            self.progress.advance(self.task)

    def log(self, line: str) -> None:
        """A line for the user, printed above the progress bar (or to ``log``)."""
        if self.progress is not None:
            self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        elif self.log_to is not None:
            self.log_to(line)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class Joiner:
    """Where the POI, land-use and trip joins of a build run: here, in this process. A subclass may run them
    elsewhere (:mod:`urbanprofile.data.distributed`: partitioned on a Dask cluster) and must give the same views."""

    def poi_counts(self, points: pd.DataFrame, regions: gpd.GeoDataFrame, category_column: str,
                   categories: list[str] | dict[str, list[str]] | None, engine: str, report: BuildReport,
                   where: str, swap_hint: str) -> pd.DataFrame:
        return poi_counts(points, regions, category_column, categories, engine, report, where, swap_hint)

    def landuse_shares(self, regions: gpd.GeoDataFrame, landuse: gpd.GeoDataFrame, class_column: str) -> pd.DataFrame:
        return landuse_shares(regions, landuse, class_column)

    def od_from_trips(self, trips: RawTable, regions: gpd.GeoDataFrame, spec: BuildSpec, report: BuildReport,
                      where: str) -> tuple[Any, pd.DataFrame | None]:
        return od_from_trips(trips, regions, spec, report, where)


def build_city(
    spec: BuildSpec, progress: bool = False, log: Callable[[str], None] | None = None, joiner: Joiner | None = None
) -> BuiltCity:
    """Read every input of ``spec`` and aggregate it per region, in memory (nothing is written).

    Args:
        spec: What to read and how.
        progress: Show a progress bar on stderr.
        log: Where lines for the user go (the H3 size estimate) when there is no progress bar.
        joiner: Where the joins run (default: :class:`Joiner`, in this process).

    Raises:
        DataError: An input is missing, unreadable or inconsistent, or a view would hold nothing (no POI, parcel
            or trip joins a region): the message names the file, field or region.
    """
    spec.check()
    joiner = joiner or Joiner()
    categories = _load_categories(spec.categories)
    report = BuildReport(city=spec.city, join_engine=spec.engine)
    n_steps = 1 + sum(x is not None for x in (spec.pois, spec.landuse, spec.trips)) + (
        spec.labels is not None or spec.label_columns is not None)
    steps = _Steps(n_steps, progress, report, log)
    start = time.perf_counter()
    sources: dict[str, Any] = {}
    views: dict[str, pd.DataFrame] = {}
    meta: dict[str, Any] = {}
    pattern_rows = None
    try:
        attributes = None
        with steps.step("regions", "reading regions"):
            if spec.regions is not None:
                regions, attributes, report.n_geometries_repaired = regions_from_file(
                    Path(spec.regions), spec.region_id_column, spec.region_name_column, spec.crs)
                report.n_region_overlaps, report.region_overlap_example = regions.attrs.pop("overlaps", (0, ""))
                report.region_kind = "polygon"
                sources["regions"] = _source(spec.regions)
            else:
                assert spec.boundary is not None and spec.h3_resolution is not None
                boundary = read_boundary(spec.boundary, spec.crs)
                report.h3_cells_estimate = h3_cell_estimate(boundary, spec.h3_resolution, spec.h3_cover)
                steps.log(f"H3 resolution {spec.h3_resolution} over {spec.boundary}: about "
                          f"{report.h3_cells_estimate:,} cells (limit --max-cells {spec.max_cells:,})")
                regions = h3_regions(boundary, spec.h3_resolution, spec.h3_cover, spec.max_cells, str(spec.boundary))
                report.region_kind = "h3"
                meta["h3_resolution"] = spec.h3_resolution
                sources["boundary"] = _source(spec.boundary)
            report.n_regions = len(regions)
        if spec.pois is not None:
            with steps.step("pois", f"joining POIs to {len(regions)} regions ({spec.engine})"):
                pois_path = Path(spec.pois)
                points = read_points(pois_path, spec.crs, spec.lon_column, spec.lat_column)
                report.n_pois_missing_location = points.n_missing
                report.n_pois_malformed = points.n_malformed
                report.n_pois_unreadable = points.n_unreadable
                report.unreadable_example = points.example
                report.n_pois_read = points.n_rows - len(points.frame)
                osm = is_osm_extract(pois_path)
                column = spec.category_column or "category"
                chosen = OSM_CATEGORIES if osm and categories is None else categories
                swap_hint = (f" (pass --lon-column {spec.lat_column} --lat-column {spec.lon_column})"
                             if points.unit in ("line", "row") else " (the file's axis order is lat, lon)")
                views["poi_counts"] = joiner.poi_counts(points.frame, regions, column, chosen, spec.engine, report,
                                                        str(pois_path), swap_hint)
                sources["pois"] = _source(pois_path)
        if spec.landuse is not None:
            with steps.step("landuse", "overlaying land use"):
                landuse = read_landuse(Path(spec.landuse), spec.landuse_class_column, spec.crs, report)
                report.n_landuse_polygons = len(landuse)
                views["landuse_counts"] = joiner.landuse_shares(regions, landuse, spec.landuse_class_column)
                if not views["landuse_counts"].to_numpy().any():
                    bounds = landuse.total_bounds
                    raise DataError(f"{spec.landuse}: no land-use polygon overlaps a region (they span "
                                    f"{_span(bounds[[0, 2]], bounds[[1, 3]])}); the view would be all zeros")
                report.n_landuse_classes = views["landuse_counts"].shape[1]
                sources["landuse"] = _source(spec.landuse)
        if spec.trips is not None:
            with steps.step("trips", "assigning trips to regions"):
                od, pattern_rows = joiner.od_from_trips(read_raw_table(Path(spec.trips)), regions, spec, report,
                                                        str(spec.trips))
                views["od_flows"] = (frame_from_array(od, regions.index, regions.index) if isinstance(od, np.ndarray)
                                     else sparse_square_view(od, regions.index))
                # A large city's time patterns go to disk as rows only (a dense view is P x N x N).
                if (pattern_rows is not None and isinstance(od, np.ndarray)
                        and spec.n_time_patterns * len(regions) ** 2 <= MAX_DENSE_PATTERN_CELLS):
                    views["od_patterns"] = patterns_view(pattern_rows, regions.index, spec.n_time_patterns)
                sources["trips"] = _source(spec.trips)
        targets = pd.DataFrame(index=regions.index)
        if spec.labels is not None or spec.label_columns is not None:
            with steps.step("labels", "matching labels"):
                targets = labels_for_regions(regions, attributes, spec, report)
                report.tasks = list(targets.columns)
                sources["labels"] = _source(spec.labels) if spec.labels is not None else {"value": "regions file"}
    finally:
        steps.close()
    report.seconds["total"] = round(time.perf_counter() - start, 3)
    meta.update({
        "source": f"build of {spec.city}",
        "family": "built",
        "city": spec.city,
        "region_kind": report.region_kind,
        "paper_folds": {"n_splits": 10, "shuffle": True, "random_state": 2024},
        "drop_zero": [],
        "location_source": f"{report.region_kind} regions",
        "units": {k: v for k, v in UNITS.items() if k in views or (k == "od_patterns" and pattern_rows is not None)},
        "notes": report.warnings(),
    })
    city = CityData(name=f"built-{spec.city}", regions=regions, views=views, targets=targets, meta=meta).validate()
    return BuiltCity(city=city, report=report, sources=sources, od_pattern_rows=pattern_rows)


def build_dataset(
    spec: BuildSpec, out: str | Path, overwrite: bool = False, progress: bool = False, command: str | None = None,
    log: Callable[[str], None] | None = None, joiner: Joiner | None = None,
) -> BuildReport:
    """Build a dataset folder from raw files; nothing is written unless every step succeeds.

    Example:
        >>> spec = BuildSpec("helsinki", boundary="Helsinki.osm.pbf", h3_resolution=9, pois=Path("Helsinki.osm.pbf"))
        >>> report = build_dataset(spec, "data/built/helsinki")  # doctest: +SKIP

    Args:
        spec: What to read and how.
        out: Folder to create (``<data_dir>/built/<city>`` makes it ``built-<city>`` in the registry).
        overwrite: Replace an existing folder.
        progress: Show a progress bar on stderr.
        command: The command line that ran the build (recorded in the manifest).
        log: Where lines for the user go when there is no progress bar.
        joiner: Where the joins run (default: in this process; see :class:`Joiner`).

    Raises:
        DataError: A file is missing, unreadable or inconsistent (the message names it); ``out`` exists and is
            not a built dataset holding only its own files, or is not replaceable without ``overwrite``; an input
            lies inside ``out``; ``out`` cannot be written.
    """
    start = time.perf_counter()
    target = Path(out).expanduser()
    check_output(target, overwrite)  # before minutes of work, and again when writing
    inputs = [spec.regions, spec.pois, spec.landuse, spec.trips, spec.labels, spec.boundary,
              spec.categories if isinstance(spec.categories, str) else None]
    for given in inputs:
        if given is not None and Path(given).exists() and Path(given).resolve().is_relative_to(target.resolve()):
            raise DataError(f"{given}: an input lies inside the output folder {target}, which the build replaces; "
                            "choose another --out")
    built = build_city(spec, progress=progress, log=log, joiner=joiner)
    report = built.report
    spec_record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(spec).items() if v is not None}
    extra = {
        "city": spec.city,
        "units": {**built.city.meta["units"], **{t: f"as in {built.sources['labels'].get('path', 'the regions file')}"
                                                 for t in built.city.targets.columns}},
        "sources": built.sources,
        "build_command": command or f"urbanprofile.data.build.build_dataset(BuildSpec(**{spec_record!r}))",
        "build_spec": spec_record,
        "n_time_patterns": spec.n_time_patterns,
        "notes": report.warnings(),
    }
    with_write = time.perf_counter()
    target = write_built(built.city, out, {**extra, "report": report.to_dict()}, overwrite=overwrite,
                         od_pattern_rows=built.od_pattern_rows if "od_patterns" not in built.city.views else None)
    report.seconds["write"] = round(time.perf_counter() - with_write, 3)
    report.seconds["total"] = round(time.perf_counter() - start, 3)
    report.output = str(target)
    return report


# -- messages ----------------------------------------------------------------------------------------

def _listed(columns: Any, limit: int = 12) -> str:
    names = [str(c) for c in columns]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _few(values: Any, limit: int = 3) -> str:
    items = list(dict.fromkeys(str(v) for v in values))
    more = ", ..." if len(items) > limit else ""
    return ", ".join(repr(v) for v in items[:limit]) + more
