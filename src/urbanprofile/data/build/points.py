"""Points read from files (CSV/Parquet with coordinates, vector files, OSM extracts) as lon/lat tables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from urbanprofile.data.build.messages import listed
from urbanprofile.data.build.osm import is_osm_extract, read_osm_pois
from urbanprofile.data.io import RawTable, first_line, parse_numbers, read_raw_table, read_vector
from urbanprofile.errors import DataError

if TYPE_CHECKING:
    import geopandas as gpd


def xy_to_lonlat(x: np.ndarray, y: np.ndarray, crs: str | None, where: str) -> tuple[np.ndarray, np.ndarray]:
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


def has_geo_metadata(path: Path) -> bool:
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
        return points_from_vector(read_osm_pois(path), path)
    if path.suffix.lower() in (".csv", ".tsv", ".txt") or not has_geo_metadata(path):
        return points_from_table(read_raw_table(path), crs, lon_column, lat_column)
    return points_from_vector(read_vector(path, crs), path)


def points_from_table(raw: RawTable, crs: str | None, lon_column: str, lat_column: str) -> PointTable:
    """Points of a plain table (all of a file, or one chunk of it) from its coordinate columns.

    Raises:
        DataError: A coordinate column is missing, or the coordinates are not degrees and no ``crs`` is given.
    """
    path, table = raw.path, raw.frame
    missing = [c for c in (lon_column, lat_column) if c not in table.columns]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} for point coordinates (columns: {listed(table.columns)})")
    x, _, x_bad = parse_numbers(table[lon_column])
    y, _, y_bad = parse_numbers(table[lat_column])
    unreadable = x_bad | y_bad
    example = ""
    if unreadable.any():
        row = int(np.argmax(unreadable))
        column, value = (lon_column, table[lon_column].iloc[row]) if x_bad[row] else \
            (lat_column, table[lat_column].iloc[row])
        example = f"first: {raw.where(row)} {column}={str(value)!r}"
    lon, lat = xy_to_lonlat(x, y, crs, str(path))
    keep = np.isfinite(lon) & np.isfinite(lat)
    located = table.drop(columns=[lon_column, lat_column]).assign(lon=lon, lat=lat)[keep].reset_index(drop=True)
    n_unreadable = int((unreadable & ~keep).sum())
    return PointTable(located, path, "line" if raw.is_text else "row", raw.lines[keep],
                      n_missing=int((~keep).sum()) - n_unreadable, n_malformed=len(raw.malformed),
                      n_unreadable=n_unreadable, example=example)


def points_from_vector(frame: gpd.GeoDataFrame, path: Path, first_feature: int = 1) -> PointTable:
    """Points of vector features in EPSG:4326 (lines and polygons become their representative point).

    Args:
        frame: The features (all of a file, or one chunk of it).
        path: The file, for messages.
        first_feature: The feature number of the first row (a chunk's offset in the file, plus one).
    """
    geoms = frame.geometry
    located_mask = geoms.notna() & ~geoms.is_empty
    geoms = geoms[located_mask]
    points = geoms.where(geoms.geom_type == "Point", geoms.representative_point())
    table = pd.DataFrame(frame[located_mask].drop(columns=frame.geometry.name))
    table["lon"] = points.x.to_numpy()
    table["lat"] = points.y.to_numpy()
    numbers = np.flatnonzero(located_mask.to_numpy()) + first_feature
    return PointTable(table.reset_index(drop=True), path, "feature", numbers, n_missing=int((~located_mask).sum()))


