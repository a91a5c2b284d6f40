"""What a build is asked to do (:class:`BuildSpec`, the one place for its defaults) and what it did."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.errors import DataError, UrbanProfileError

#: The category that POIs of unknown category are counted under.
OTHER = "other"
#: Spatial join engines; ``auto`` picks :data:`DEFAULT_ENGINE` (the faster one in ``benchmarks/build_city.py``).
JOIN_ENGINES = ("auto", "geopandas", "duckdb")
DEFAULT_ENGINE = "geopandas"
LABEL_AGGREGATIONS = ("mean", "sum", "median", "max", "min")
#: How POI and trip files are read: ``memory`` (all at once, geopandas), ``streaming`` (in chunks, memory bounded by the
#: chunk) or ``auto`` (streaming from :data:`STREAMING_ABOVE_BYTES`; see ``benchmarks/build_streaming.py``);
#: ``partitioned`` builds H3 cells partition by partition, holding no polygon per cell (``data/build/partitioned.py``,
#: taken by ``auto`` for large H3 builds it can do).
BUILD_ENGINES = ("auto", "memory", "streaming", "partitioned")
#: Rows per chunk of a streamed build: about 200-300 MB of working memory per million POIs (Parquet or CSV).
DEFAULT_CHUNK_ROWS = 1_000_000
#: POI and trip files from this size are streamed by ``auto``: at 100,000 POIs (2 MB of Parquet) both engines take
#: the same time, from 1,000,000 (16 MB) streaming is faster and smaller (``benchmarks/build_streaming.py``).
STREAMING_ABOVE_BYTES = 8 * 1024 * 1024
#: Default cap on the H3 cells a build may cut (``--max-cells``): a typo in ``--h3-res`` stops with the estimate
#: instead of running for an hour and filling the disk.
DEFAULT_MAX_CELLS = 200_000
_CITY_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


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
        build_engine: How POI and trip files are read: ``memory``, ``streaming`` (CSV, Parquet and GeoParquet in
            chunks of ``chunk_rows``) or ``auto`` (streaming for files from :data:`STREAMING_ABOVE_BYTES`).
        chunk_rows: Rows per chunk of a streamed read.
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
    build_engine: str = "auto"
    chunk_rows: int = DEFAULT_CHUNK_ROWS

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
        if self.build_engine not in BUILD_ENGINES:
            raise UrbanProfileError(f"unknown build engine {self.build_engine!r}; valid: {', '.join(BUILD_ENGINES)}")
        if self.chunk_rows < 1:
            raise UrbanProfileError(f"--chunk-rows must be >= 1, got {self.chunk_rows}")
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
    read_engines: dict[str, str] = field(default_factory=dict)
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
    #: A large city's OD matrix (SciPy sparse, regions in order) when :func:`build_city` kept it out of the views.
    od_matrix: Any = None


