"""The spatial join of points to regions, with geopandas or DuckDB's spatial extension."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from urbanprofile.data.build.messages import span
from urbanprofile.data.build.spec import DEFAULT_ENGINE, JOIN_ENGINES
from urbanprofile.errors import DataError, UrbanProfileError, require

if TYPE_CHECKING:
    import geopandas as gpd


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
        raise DataError(f"{where}: none of the {n} {what} lies inside a region ({what} span {span(lon, lat)}; "
                        f"regions span {span(bounds[[0, 2]], bounds[[1, 3]])}): wrong file or CRS?")


