"""Regions of a build: region ids, polygons read and repaired, overlaps, a boundary cut into H3 cells."""

from __future__ import annotations

import math
import re
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from urbanprofile.data.build.h3_fast import cell_centres, cell_polygons
from urbanprofile.data.build.messages import few, listed
from urbanprofile.data.build.osm import is_osm_extract, osm_extent
from urbanprofile.data.io import NA_TOKENS, centroid_lonlat, read_vector
from urbanprofile.errors import DataError, require

if TYPE_CHECKING:
    import geopandas as gpd


#: Regions overlapping by more than this share of the smaller one are an error (a point counts in one only).
OVERLAP_ERROR = 0.5


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


def id_keys(values: pd.Series | pd.Index) -> pd.Index:
    """Ids as text for matching across files (``12``, ``12.0`` and ``"12"`` are the same region; ``"012"`` is
    not, as codes keep their leading zeros)."""
    keys = pd.Series(region_ids(pd.Series(values)).astype(str))
    return pd.Index(keys.str.replace(_INTEGRAL_TEXT, r"\1", regex=True))


def polygonal_part(geom: Any) -> Any:
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
        geoms[invalid] = geoms[invalid].make_valid().map(polygonal_part)
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
        raise DataError(f"{path}: no field {column!r} for region ids (fields: {listed(frame.columns)})")
    if column is not None and missing_ids(frame[column]).any():
        rows = np.flatnonzero(missing_ids(frame[column]))
        raise DataError(f"{path}: {len(rows)} regions have no id in field {column!r} (first: feature {rows[0] + 1})")
    ids = region_ids(frame[column]) if column else pd.Index(np.arange(len(frame)), name="region_id")
    if ids.has_duplicates:
        raise DataError(f"{path}: duplicate region ids in {column!r}: {few(ids[ids.duplicated()])}")
    if name_column is not None and name_column not in frame.columns:
        raise DataError(f"{path}: no field {name_column!r} for region names (fields: {listed(frame.columns)})")
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
    import shapely

    require("h3", "build")
    from h3.api import basic_int as h3i

    if max_cells is not None:
        estimate = h3_cell_estimate(boundary, resolution, cover)
        if estimate > max_cells:
            raise DataError(f"{where}: about {estimate:,} H3 cells at resolution {resolution}, more than "
                            f"--max-cells {max_cells:,}; use a coarser --h3-res, or raise --max-cells if you "
                            "mean it")
    shape = boundary.to_crs("EPSG:4326").geometry.make_valid().union_all()
    # Cells as 64-bit integers while the set grows: a country's millions of cell strings in Python sets cost GBs.
    cells = np.unique(np.fromiter(h3i.geo_to_cells(shape, resolution), dtype=np.uint64)) if not shape.is_empty \
        else np.zeros(0, dtype=np.uint64)
    if cover and not shape.is_empty:
        if not len(cells):  # a boundary smaller than one cell
            point = shape.representative_point()
            cells = np.array([h3i.latlng_to_cell(point.y, point.x, resolution)], dtype=np.uint64)
        shapely.prepare(shape)
        frontier = cells
        while len(frontier):  # grow outwards while neighbouring cells still overlap the boundary
            near = np.fromiter(chain.from_iterable(h3i.grid_disk(int(c), 1) for c in frontier), dtype=np.uint64)
            ring = np.setdiff1d(np.unique(near), cells, assume_unique=True)
            frontier = ring[shapely.intersects(cell_polygons([h3i.int_to_str(c) for c in ring.tolist()]), shape)]
            cells = np.union1d(cells, frontier)
    if not len(cells):
        raise DataError(f"the boundary holds no H3 cell centre at resolution {resolution} (try a finer --h3-res)")
    ordered = [h3i.int_to_str(c) for c in cells.tolist()]  # Python ints: numpy scalars convert 10 times slower
    ordered.sort()  # the strings' order (already the integers' order at one resolution, so this is one pass)
    del cells
    lon, lat = cell_centres(ordered)
    ids = pd.Index(ordered, name="region_id", dtype=str)
    return gpd.GeoDataFrame({"lon": lon, "lat": lat}, index=ids, geometry=cell_polygons(ordered), crs="EPSG:4326")


