"""The spatial join of points to regions, with geopandas or DuckDB's spatial extension."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    refuse_points_outside(len(lon), int((position >= 0).sum()),
                          lambda: int((assign_points(lat, lon, regions, engine) >= 0).sum())
                          if (np.abs(lat) <= 180).all() else 0,
                          lambda: span(lon, lat), regions, where, what, swap_hint)


def refuse_points_outside(
    n: int, inside: int, swapped: Callable[[], int], extent: Callable[[], str], regions: gpd.GeoDataFrame,
    where: str, what: str = "POIs", swap_hint: str = "",
) -> None:
    """The judgement of :func:`check_points_inside` from counts (a streamed build has no array of all points).

    Args:
        n: Points with a location.
        inside: Points inside a region.
        swapped: Counts the points inside a region with longitude and latitude swapped (0 when that is impossible);
            called only when most points are outside.
        extent: Describes the points' extent (``lon a..b, lat c..d``), for the message.
        regions: The regions.
        where, what, swap_hint: The file, what the points are, and how to swap the columns, for messages.

    Raises:
        DataError: Naming the file, how many points lie inside, and the extents (or the swap).
    """
    if n == 0:
        raise DataError(f"{where}: no {what} with a location")
    if inside >= n / 2:
        return
    n_swapped = swapped()
    if n_swapped >= n / 2 and n_swapped > inside:
        raise DataError(f"{where}: {inside} of {n} {what} lie inside a region, {n_swapped} would with longitude and "
                        f"latitude swapped: the coordinates look swapped{swap_hint}")
    if inside == 0:
        bounds = regions.total_bounds
        raise DataError(f"{where}: none of the {n} {what} lies inside a region ({what} span {extent()}; "
                        f"regions span {span(bounds[[0, 2]], bounds[[1, 3]])}): wrong file or CRS?")


#: Points per batch of the edge test (keeps its temporary arrays near 100 MB).
_EDGE_BATCH = 200_000
#: A point closer than this to an edge line (a cross product in degrees², about 0.05 mm on a resolution-9 edge and
#: 10,000 times the rounding error of the product) is judged by the polygon index instead.
_EDGE_MARGIN = 1e-12


class RegionJoiner:
    """Assigns chunk after chunk of points to the same regions, as :func:`assign_points` does for all at once.

    The spatial index over the regions is built once (a streamed build joins millions of points in chunks). With
    ``h3_resolution`` the regions are that resolution's H3 cells (ids are cell strings): a point's cell comes
    straight from h3 and is kept when the point lies strictly inside the cell's polygon; the few points on or
    next to a cell border, or outside every cell, go through the index, so a point on a shared border still goes
    to the first region in order, as with :func:`assign_points`.

    Args:
        regions: Polygons in EPSG:4326.
        engine: ``geopandas``/``auto`` (a shapely index, the one ``sjoin`` uses) or ``duckdb`` (per chunk).
        h3_resolution: The resolution of H3 cell regions, or ``None`` for other polygons.
    """

    def __init__(self, regions: gpd.GeoDataFrame, engine: str = "auto", h3_resolution: int | None = None) -> None:
        self.regions = regions
        self.engine = DEFAULT_ENGINE if engine == "auto" else engine
        self.h3_resolution = h3_resolution
        self.geoms = regions.geometry.to_numpy()
        self._tree: Any = None
        self._cells: np.ndarray | None = None

    def assign(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """The position (0..N-1) of the region each point falls in, or -1 outside every region."""
        if self.h3_resolution is None:
            return self._indexed(lon, lat)
        position = self._h3_positions(lon, lat)
        found = np.flatnonzero(position >= 0)
        sure = np.zeros(len(lon), dtype=bool)
        for start in range(0, len(found), _EDGE_BATCH):
            part = found[start:start + _EDGE_BATCH]
            sure[part] = self._clearly_inside(position[part], lon[part], lat[part])
        rest = np.flatnonzero(~sure)
        if len(rest):
            position[rest] = self._indexed(lon[rest], lat[rest])
        return position

    def _clearly_inside(self, position: np.ndarray, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """Whether each point lies clearly inside the polygon at ``position``: on the inner side of every edge by
        more than the rounding error of the test (such a point is in no other region, as regions do not overlap
        by more than a shared border). A point that is not is left to the polygon index, so none is misplaced.

        The edges are taken from the polygons of this batch's regions only: kept for every region they would be
        about 100 bytes per region (0.4 GB for a country of 4 M cells) for the whole build.
        """
        import shapely

        regions, at = np.unique(position, return_inverse=True)
        coords, owner = shapely.get_coordinates(shapely.get_exterior_ring(self.geoms[regions]), return_index=True)
        lengths = np.bincount(owner, minlength=len(regions))  # vertices per ring, the first one repeated
        first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        slot = np.arange(len(coords)) - first[owner]  # the vertex's place in its ring
        k = int(lengths.max()) - 1
        edge = slot < lengths[owner] - 1  # every vertex but the closing one starts an edge
        start = np.zeros((len(regions), k, 2))
        end = np.zeros((len(regions), k, 2))
        valid = np.zeros((len(regions), k), dtype=bool)
        start[owner[edge], slot[edge]] = coords[edge]
        end[owner[edge], slot[edge]] = coords[np.flatnonzero(edge) + 1]
        valid[owner[edge], slot[edge]] = True
        orientation = np.sign(np.sum(start[..., 0] * end[..., 1] - end[..., 0] * start[..., 1], axis=1))
        a, b = start[at], end[at]
        cross = ((b[..., 0] - a[..., 0]) * (lat[:, None] - a[..., 1])
                 - (b[..., 1] - a[..., 1]) * (lon[:, None] - a[..., 0])) * orientation[at][:, None]
        return np.all((cross > _EDGE_MARGIN) | ~valid[at], axis=1)

    def _h3_positions(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """The position of each point's H3 cell among the regions, -1 where that cell is not a region."""
        require("h3", "build")
        from h3.api import basic_int

        if self._cells is None:
            cells = np.array([basic_int.str_to_int(c) for c in self.regions.index], dtype=np.uint64)
            self._order = np.argsort(cells)
            self._cells = cells[self._order]
        resolution = self.h3_resolution
        valid = (np.abs(lat) <= 90) & (np.abs(lon) <= 180)  # h3 refuses others; the index says they are outside
        cell_of = np.frompyfunc(lambda y, x: basic_int.latlng_to_cell(y, x, resolution), 2, 1)
        cells = np.zeros(len(lon), dtype=np.uint64)
        if valid.any():
            cells[valid] = cell_of(lat[valid], lon[valid]).astype(np.uint64)
        at = np.minimum(np.searchsorted(self._cells, cells), len(self._cells) - 1)
        hit = valid & (self._cells[at] == cells)
        return np.where(hit, self._order[at], -1).astype(np.int64)

    def _indexed(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        if self.engine == "duckdb":
            return assign_points(lon, lat, self.regions, "duckdb")
        import shapely

        if self._tree is None:
            self._tree = shapely.STRtree(self.geoms)
        point, region = self._tree.query(shapely.points(lon, lat), predicate="intersects")
        first = np.full(len(lon), len(self.geoms), dtype=np.int64)
        np.minimum.at(first, point, region)  # a point on a shared border goes to the first region
        return np.where(first < len(self.geoms), first, -1)
