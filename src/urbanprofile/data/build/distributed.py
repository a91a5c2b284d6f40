"""The dataset build as a partitioned job on a Dask cluster, giving exactly the single-machine dataset.

The client reads and checks every input with the single-machine readers (so every message, count and line number
in the report is the one ``urbanprofile build`` gives), cuts the regions into partitions and hands the spatial
joins to the workers:

- regions are partitioned by H3 parent cell at a coarser resolution (H3 regions) or by spatial blocks (polygons);
- a point (a POI, either end of a trip) is routed to exactly one partition by where it lies (H3: the cell it falls
  in; polygons: the block), and joined there against the partition's regions plus the neighbouring regions that
  reach into it (its halo), so a point on a shared border gets the region it gets on one machine (the first in
  region order);
- POIs are counted per region and category on the workers; only the counts come back;
- a land-use parcel goes to every partition whose extent it touches, and each partition overlays its own regions
  in the city's UTM zone, so every region's shares are the single-machine ones;
- both ends of a trip are joined where they lie (possibly in two partitions) and come back as region positions,
  from which the client counts the OD matrix and time patterns with the single-machine code;
- a Parquet or GeoParquet POI file that the build streams (``--engine streaming``, or ``auto`` on a large file) is
  read by the workers, each task its own share of the file's row groups (the file's path must be one the workers
  can open, as on a shared file system): the share's points are routed to the partitions and joined there, and
  each share's counts per (region, raw category) and figures come back and are added in file order with the
  streamed build's code, so the input never passes through the client;
- a Parquet trip file that the build streams is read by the workers too, one task per chunk of ``chunk_rows`` rows
  (the very rows of the client's chunk on one machine, so that even fractional trip counts are summed in the same
  order): each chunk's trip ends are routed and joined in the partitions, and the chunk's counts (per
  origin-destination pair and time pattern, and the trip figures) come back and are merged in file order
  (``TripCounts.merge``);
- any other file that the build streams (CSV POIs or trips) is read on the client in chunks of ``chunk_rows`` as on
  one machine, and each chunk's points are routed and joined on the workers; their region positions come back and
  are counted on the client with the streamed build's code, so the client holds one chunk at a time.

``docs/scale-out.md`` says how the same job spreads over a real cluster and what moves over the network.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from urbanprofile.data.build.aggregate import landuse_shares, map_categories, record_poi_figures
from urbanprofile.data.build.join import assign_points, check_points_inside
from urbanprofile.data.build.pipeline import Joiner, build_dataset
from urbanprofile.data.build.points import PointTable
from urbanprofile.data.build.spec import BuildReport, BuildSpec
from urbanprofile.data.build.streaming import (
    PoiChunk,
    parquet_file,
    poi_chunk,
    point_chunks,
    stream_poi_counts,
    table_chunks,
    table_columns,
)
from urbanprofile.data.build.trips import TripCounts, od_from_trips
from urbanprofile.data.city import frame_from_array
from urbanprofile.data.io import RawTable, first_line
from urbanprofile.data.loaders.built import check_output
from urbanprofile.errors import DataError, UrbanProfileError, require

if TYPE_CHECKING:
    import geopandas as gpd

#: Partitions of the regions when ``--parts`` is not given: several per worker of a small cluster, so that a slow
#: partition does not hold the others up.
DEFAULT_PARTS = 16
#: Worker processes of the local cluster started by ``--workers`` without a number.
DEFAULT_WORKERS = 2
#: Points per routing task: each task routes a slice of the input to the partitions.
ROUTE_CHUNK = 250_000
#: Shares of a file read on the workers at once, per worker: enough to keep every worker busy, few enough that the
#: cluster holds a bounded part of the file.
SHARES_IN_FLIGHT_PER_WORKER = 2


@dataclass
class ClusterSpec:
    """Where a build runs and how finely it is cut.

    Attributes:
        workers: Worker processes (one thread each) of a local cluster started for the build; unused with
            ``scheduler``.
        scheduler: Address of a running Dask scheduler (``tcp://host:8786``); ``None`` starts a local cluster.
        parts: How many partitions the regions are cut into (H3 parent cells grouped, or spatial blocks).
    """

    workers: int = DEFAULT_WORKERS
    scheduler: str | None = None
    parts: int = DEFAULT_PARTS

    def check(self) -> None:
        """Raise a one-line error for settings that cannot run."""
        if self.workers < 1:
            raise UrbanProfileError(f"--workers must be >= 1, got {self.workers}")
        if self.parts < 1:
            raise UrbanProfileError(f"--parts must be >= 1, got {self.parts}")
        if self.scheduler is not None and not self.scheduler.strip():
            raise UrbanProfileError("--scheduler needs an address such as tcp://host:8786")


def cluster_options(workers: int | None, scheduler: str | None, parts: int | None) -> ClusterSpec | None:
    """The cluster asked for on the command line, or ``None`` for a build in this process.

    Raises:
        UrbanProfileError: ``--parts`` without ``--workers`` or ``--scheduler``, both of these, or a setting out of
            range.
    """
    if workers is None and scheduler is None:
        if parts is not None:
            raise UrbanProfileError("--parts needs --workers N (a local cluster) or --scheduler ADDRESS")
        return None
    if workers is not None and scheduler is not None:
        raise UrbanProfileError("give --workers N (a local cluster started for the build) or --scheduler ADDRESS "
                                "(a running cluster, whose workers are its own), not both")
    cluster = ClusterSpec(workers=DEFAULT_WORKERS if workers is None else workers, scheduler=scheduler,
                          parts=DEFAULT_PARTS if parts is None else parts)
    cluster.check()
    return cluster


# -- partitions --------------------------------------------------------------------------------------
@dataclass
class BlockRouter:
    """Routes points to an ``nx`` x ``ny`` grid of blocks over the regions' extent; outside it: -1."""

    x0: float
    y0: float
    x1: float
    y1: float
    nx: int
    ny: int

    def _steps(self) -> tuple[float, float]:
        return (self.x1 - self.x0) / self.nx or 1.0, (self.y1 - self.y0) / self.ny or 1.0

    def route(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        dx, dy = self._steps()
        with np.errstate(invalid="ignore"):
            inside = (lon >= self.x0) & (lon <= self.x1) & (lat >= self.y0) & (lat <= self.y1)
            ix = np.clip(np.floor((np.where(inside, lon, self.x0) - self.x0) / dx), 0, self.nx - 1).astype(np.int64)
            iy = np.clip(np.floor((np.where(inside, lat, self.y0) - self.y0) / dy), 0, self.ny - 1).astype(np.int64)
        return np.where(inside, iy * self.nx + ix, -1)

    def block(self, part: int) -> tuple[float, float, float, float]:
        """The block's rectangle, widened by a hair: rounding in :meth:`route` may send a point on a block's edge
        to either side, and the halo must hold its regions on both."""
        dx, dy = self._steps()
        ix, iy = part % self.nx, part // self.nx
        hair = 1e-9 * max(self.x1 - self.x0, self.y1 - self.y0, 1e-9)
        east = self.x1 if ix == self.nx - 1 else self.x0 + (ix + 1) * dx
        north = self.y1 if iy == self.ny - 1 else self.y0 + (iy + 1) * dy
        return self.x0 + ix * dx - hair, self.y0 + iy * dy - hair, east + hair, north + hair


@dataclass
class H3Router:
    """Routes points by the H3 cell they fall in: a region's cell goes to the region's partition, a cell next to
    regions to the partition of its first neighbouring region, any other cell nowhere (-1)."""

    resolution: int
    cells: dict[str, int]

    def route(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        h3 = require("h3", "build")
        valid = np.isfinite(lon) & np.isfinite(lat) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180)
        out = np.full(len(lon), -1, dtype=np.int64)
        rows = np.flatnonzero(valid)
        out[rows] = [self.cells.get(h3.latlng_to_cell(y, x, self.resolution), -1)
                     for x, y in zip(lon[rows].tolist(), lat[rows].tolist(), strict=True)]
        return out


@dataclass
class Partitions:
    """How the regions are cut.

    Attributes:
        router: Sends each point to one partition.
        own: Per partition, the positions (in region order) of the regions it owns; every region is owned once.
        halo: Per partition, the positions (ascending) of every region that a point routed there can lie in.
        parent_resolution: H3 resolution of the parent cells that were grouped (H3 regions only).
    """

    router: BlockRouter | H3Router
    own: list[np.ndarray]
    halo: list[np.ndarray]
    parent_resolution: int | None = None

    @property
    def n(self) -> int:
        return len(self.own)

    def describe(self) -> str:
        used = sum(len(h) > 0 for h in self.halo)
        copies = sum(len(h) for h in self.halo) / max(1, sum(len(o) for o in self.own))
        how = (f"H3 parents at resolution {self.parent_resolution}" if self.parent_resolution is not None
               else f"{self.router.nx} x {self.router.ny} blocks" if isinstance(self.router, BlockRouter) else "")
        return f"{used} partitions ({how}); each region is sent {copies:.2f} times with its neighbours"


def partition_regions(regions: gpd.GeoDataFrame, parts: int, h3_resolution: int | None = None) -> Partitions:
    """Cut the regions into about ``parts`` partitions: H3 cells by parent cell, polygons by spatial blocks.

    Args:
        regions: The build's regions (EPSG:4326), in region order.
        parts: Partitions wanted (fewer when there are fewer regions or parent cells).
        h3_resolution: The cells' resolution when the regions are H3 cells (their ids are the cell strings).
    """
    if h3_resolution is not None:
        return _h3_partitions(regions, parts, h3_resolution)
    return _block_partitions(regions, parts)


def _h3_partitions(regions: gpd.GeoDataFrame, parts: int, resolution: int) -> Partitions:
    h3 = require("h3", "build")
    cells = [str(c) for c in regions.index]
    position = {c: i for i, c in enumerate(cells)}
    # The coarsest parent resolution with at least `parts` parents: few, large parents keep neighbours together.
    parent_resolution = resolution
    for r in range(resolution + 1):
        if len({h3.cell_to_parent(c, r) for c in cells}) >= parts:
            parent_resolution = r
            break
    parents = np.array([h3.cell_to_parent(c, parent_resolution) for c in cells])
    unique, inverse, counts = np.unique(parents, return_inverse=True, return_counts=True)
    # Consecutive parents (H3 order keeps them close) cut into `parts` groups of about as many regions, each
    # holding at least one parent.
    n_parts = min(parts, len(unique))
    total = np.cumsum(counts)
    cuts = [0]
    for k in range(1, n_parts):
        wanted = int(np.searchsorted(total, k * len(cells) / n_parts)) + 1
        cuts.append(min(max(cuts[-1] + 1, wanted), len(unique) - (n_parts - k)))
    group = np.zeros(len(unique), dtype=np.int64)
    for cut in cuts[1:]:
        group[cut:] += 1
    part = group[inverse]
    route = dict(zip(cells, part.tolist(), strict=True))
    for i, cell in enumerate(cells):  # in region order: a cell beside regions goes with its first neighbour
        for neighbour in h3.grid_disk(cell, 1):
            if neighbour not in route:
                route[neighbour] = int(part[i])
    # A point inside a cell's polygon falls in that cell or one next to it (the polygons are the cells drawn with
    # straight edges), so the regions one ring around every cell routed to a partition are all it can lie in.
    halo: list[set[int]] = [set() for _ in range(n_parts)]
    for cell, p in route.items():
        halo[p].update(position[n] for n in h3.grid_disk(cell, 1) if n in position)
    own = [np.flatnonzero(part == p) for p in range(n_parts)]
    return Partitions(H3Router(resolution, route), own, [np.array(sorted(h), dtype=np.int64) for h in halo],
                      parent_resolution)


def _block_partitions(regions: gpd.GeoDataFrame, parts: int) -> Partitions:
    import shapely

    geoms = regions.geometry.to_numpy()
    x0, y0, x1, y1 = (float(v) for v in regions.total_bounds)
    width, height = x1 - x0, y1 - y0
    if width > 0 and height > 0:
        nx = min(parts, max(1, round(math.sqrt(parts * width / height))))
    else:
        nx = parts if width > 0 else 1
    ny = max(1, round(parts / nx))
    router = BlockRouter(x0, y0, x1, y1, nx, ny)
    bounds = shapely.bounds(geoms)
    # A region belongs to the block of its bounding box's centre, which always lies inside the grid.
    owner = router.route((bounds[:, 0] + bounds[:, 2]) / 2, (bounds[:, 1] + bounds[:, 3]) / 2)
    tree = shapely.STRtree(geoms)
    own, halo = [], []
    for p in range(nx * ny):
        own.append(np.flatnonzero(owner == p))
        halo.append(np.sort(tree.query(shapely.box(*router.block(p)), predicate="intersects")).astype(np.int64))
    return Partitions(router, own, halo)


# -- tasks run on the workers ------------------------------------------------------------------------
def _hold(value: Any) -> Any:
    """A task returning its argument: unlike scattered data, a task's input stays with the scheduler, so what a
    lost worker held is recomputed elsewhere."""
    return value


def _route(router: BlockRouter | H3Router, rows: np.ndarray, lon: np.ndarray, lat: np.ndarray,
           payload: np.ndarray | None) -> dict[int, tuple[np.ndarray, ...]]:
    """Split a slice of points by partition: ``{partition: (rows, lon, lat[, payload])}``."""
    if not len(lon):  # a chunk of trips given as region ids, or whose rows all lack a location
        return {}
    part = router.route(lon, lat)
    order = np.argsort(part, kind="stable")
    keys, starts = np.unique(part[order], return_index=True)
    pieces: dict[int, tuple[np.ndarray, ...]] = {}
    for key, chunk in zip(keys.tolist(), np.split(order, starts[1:]), strict=True):
        if key >= 0:
            arrays = (rows[chunk], lon[chunk], lat[chunk])
            pieces[key] = (*arrays, payload[chunk]) if payload is not None else arrays
    return pieces


def _piece(routed: dict[int, tuple[np.ndarray, ...]], part: int) -> tuple[np.ndarray, ...] | None:
    return routed.get(part)


def _gathered(pieces: tuple[tuple[np.ndarray, ...] | None, ...]) -> list[np.ndarray] | None:
    present = [p for p in pieces if p is not None]
    if not present:
        return None
    return [np.concatenate([p[i] for p in present]) for i in range(len(present[0]))]


def _join(halo: gpd.GeoDataFrame, halo_positions: np.ndarray, engine: str, lon: np.ndarray,
          lat: np.ndarray) -> np.ndarray:
    """Region positions (in the whole city's order) of points, -1 outside: the halo holds every region a point
    routed here can lie in, in region order, so the first region found is the first on one machine."""
    local = assign_points(lon, lat, halo, engine)
    return np.where(local >= 0, halo_positions[np.maximum(local, 0)], -1)


def _count_part(halo: gpd.GeoDataFrame, halo_positions: np.ndarray, engine: str, n_columns: int,
                *pieces: tuple[np.ndarray, ...] | None) -> tuple[np.ndarray, np.ndarray, int]:
    """POI counts of one partition as (region position x n_columns + category code, count) pairs."""
    arrays = _gathered(pieces)
    if arrays is None:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 0
    _, lon, lat, codes = arrays
    position = _join(halo, halo_positions, engine, lon, lat)
    inside = position >= 0
    keys, counts = np.unique(position[inside] * n_columns + codes[inside], return_counts=True)
    return keys, counts, int(inside.sum())


def _assign_part(halo: gpd.GeoDataFrame, halo_positions: np.ndarray, engine: str,
                 *pieces: tuple[np.ndarray, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    """(input row, region position) of the points of one partition that lie in a region."""
    arrays = _gathered(pieces)
    if arrays is None:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rows, lon, lat = arrays
    position = _join(halo, halo_positions, engine, lon, lat)
    inside = position >= 0
    return rows[inside], position[inside]


def _landuse_part(own: gpd.GeoDataFrame, parcels: gpd.GeoDataFrame, class_column: str, utm: Any,
                  classes: list[str]) -> np.ndarray:
    """Land-use shares of the regions one partition owns, over the whole city's classes."""
    shares = landuse_shares(own, parcels, class_column, utm=utm)
    return shares.reindex(columns=classes, fill_value=0.0).to_numpy(dtype=float)


def parquet_shares(path: Path, rows_per_share: int) -> list[tuple[list[int], int]]:
    """Cut a Parquet file into shares of whole row groups, about ``rows_per_share`` rows each (a larger row group is
    a share of its own): ``(row groups, the share's first row in the file)``. Only the file's footer is read.

    Raises:
        DataError: The file is not readable Parquet.
    """
    meta = parquet_file(path).metadata
    shares: list[tuple[list[int], int]] = []
    first = rows = 0
    groups: list[int] = []
    for group in range(meta.num_row_groups):
        n = meta.row_group(group).num_rows
        if groups and rows + n > rows_per_share:
            shares.append((groups, first))
            first, rows, groups = first + rows, 0, []
        groups.append(group)
        rows += n
    if groups:
        shares.append((groups, first))
    return shares


def _read_share(path: str, row_groups: list[int], first_row: int, spec: BuildSpec, column: str,
                swap: bool) -> list[PointTable]:
    """Read one share of a POI file on a worker, with the single-machine reader: its chunks of points, each kept to
    the coordinates and the category column (the coordinates swapped for the second pass that looks for swapped
    axes)."""
    if not Path(path).is_file():
        raise DataError(f"{path}: not found on a Dask worker (the workers read a streamed Parquet POI file "
                        "themselves: give a path they can open, as on a shared file system)")
    tables = []
    for chunk in point_chunks(Path(path), spec.crs, spec.lon_column, spec.lat_column, spec.chunk_rows, row_groups,
                              first_row):
        if column not in chunk.frame.columns:
            poi_chunk(chunk, column, np.zeros(0, dtype=np.int64))  # raises the single-machine message
        frame = chunk.frame[["lon", "lat", column]]
        if swap:
            frame = frame.assign(lon=frame["lat"].to_numpy(), lat=frame["lon"].to_numpy())
        chunk.frame = frame
        tables.append(chunk)
    return tables


def _share_points(tables: list[PointTable]) -> tuple[np.ndarray, np.ndarray]:
    if not tables:
        return np.zeros(0), np.zeros(0)
    return (np.concatenate([t.frame["lon"].to_numpy(float) for t in tables]),
            np.concatenate([t.frame["lat"].to_numpy(float) for t in tables]))


def _route_share(router: BlockRouter | H3Router, tables: list[PointTable]) -> dict[int, tuple[np.ndarray, ...]]:
    lon, lat = _share_points(tables)
    return _route(router, np.arange(len(lon)), lon, lat, None)


def _summarise_share(tables: list[PointTable], column: str,
                     *assigned: tuple[np.ndarray, np.ndarray]) -> list[PoiChunk]:
    """The share's chunk summaries, from the region positions its points got in the partitions."""
    position = np.full(sum(len(t.frame) for t in tables), -1, dtype=np.int64)
    for rows, found in assigned:
        position[rows] = found
    out, start = [], 0
    for table in tables:
        out.append(poi_chunk(table, column, position[start:start + len(table.frame)]))
        start += len(table.frame)
    return out


def _read_rows(path: str, start: int, stop: int) -> RawTable:
    """Rows ``start`` to ``stop`` (from 0) of a Parquet table, read on a worker from the row groups holding them: the
    chunk a single-machine streamed read gives for these rows, with the file's row numbers."""
    if not Path(path).is_file():
        raise DataError(f"{path}: not found on a Dask worker (the workers read a streamed Parquet trip file "
                        "themselves: give a path they can open, as on a shared file system)")
    parquet = parquet_file(Path(path))
    groups: list[int] = []
    first = offset = 0
    for group in range(parquet.metadata.num_row_groups):
        n = parquet.metadata.row_group(group).num_rows
        if offset < stop and offset + n > start:
            first = first if groups else offset
            groups.append(group)
        offset += n
    frame = parquet.read_row_groups(groups).slice(start - first, stop - start).to_pandas()
    return RawTable(Path(path), frame, start + 1 + np.arange(len(frame)))


def _trip_counter(regions: pd.DataFrame, spec: BuildSpec, where: str, columns: list[str],
                  assign: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> TripCounts:
    """A worker's counter of one chunk: the client's settings (regions: their ids only), its own throwaway report."""
    def no_join(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        raise AssertionError("trip ends are joined in the partitions")

    return TripCounts(regions, spec, BuildReport(city=spec.city), where, columns,
                      assign or no_join)


def _read_trip_chunk(path: str, start: int, stop: int, regions: pd.DataFrame, spec: BuildSpec,
                     columns: list[str]) -> tuple[RawTable, np.ndarray, np.ndarray]:
    """Read one chunk of a trip file on a worker, with the trip ends the count joins (lon, lat)."""
    raw = _read_rows(path, start, stop)
    return (raw, *_trip_counter(regions, spec, path, columns).ends_to_join(raw.frame))


def _route_trip_chunk(router: BlockRouter | H3Router,
                      chunk: tuple[RawTable, np.ndarray, np.ndarray]) -> dict[int, tuple[np.ndarray, ...]]:
    _, lon, lat = chunk
    return _route(router, np.arange(len(lon)), lon, lat, None)


def _count_trip_chunk(chunk: tuple[RawTable, np.ndarray, np.ndarray], regions: pd.DataFrame, spec: BuildSpec,
                      path: str, columns: list[str], *assigned: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Count one chunk of trips with the single-machine counter, its ends' regions found in the partitions."""
    raw, lon, _ = chunk
    position = np.full(len(lon), -1, dtype=np.int64)
    for rows, found in assigned:
        position[rows] = found
    counter = _trip_counter(regions, spec, path, columns, assign=lambda lon, lat: position)
    counter.add(raw)
    return counter.summary()


# -- the joiner ----------------------------------------------------------------------------------------
@dataclass
class _Plan:
    regions: gpd.GeoDataFrame
    partitions: Partitions
    router: Any
    halos: list[Any]


@dataclass
class JobFigures:
    """What a distributed build sent to the workers (for the benchmark and the log)."""

    partitions: int = 0
    tasks: int = 0
    shares_read_on_workers: int = 0
    points_routed: int = 0
    parcels_sent: int = 0
    parcels: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


class DaskJoiner(Joiner):
    """The joins of a build as a partitioned job on a Dask cluster (see the module's docstring).

    Args:
        client: A ``distributed.Client`` connected to the cluster.
        parts: Partitions wanted.
        h3_resolution: The regions' H3 resolution when they are H3 cells (``None``: polygons, cut into blocks).
        log: Where a line describing the partitions goes.
    """

    def __init__(self, client: Any, parts: int = DEFAULT_PARTS, h3_resolution: int | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.parts = parts
        self.h3_resolution = h3_resolution
        self.log = log
        self.figures = JobFigures()
        self._plan_of: _Plan | None = None

    # the three joins of a build
    def poi_counts(self, points: pd.DataFrame, regions: gpd.GeoDataFrame, category_column: str,
                   categories: list[str] | dict[str, list[str]] | None, engine: str, report: BuildReport,
                   where: str, swap_hint: str) -> pd.DataFrame:
        if category_column not in points.columns or len(points) == 0:
            # The single-machine join says what is wrong in the same words (and raises).
            return super().poi_counts(points, regions, category_column, categories, engine, report, where, swap_hint)
        codes, names, unknown = map_categories(points[category_column], categories)
        lon, lat = points["lon"].to_numpy(float), points["lat"].to_numpy(float)
        plan = self._plan(regions)
        routed = self._routed(plan, lon, lat, codes.astype(np.int64))
        futures = [self._submit(_count_part, plan.halos[p], plan.partitions.halo[p], engine, len(names),
                                *self._pieces(routed, p)) for p in self._used(plan)]
        counts = np.zeros(len(regions) * len(names), dtype=np.int64)
        n_inside = 0
        for keys, found, inside in self._gather(futures):
            np.add.at(counts, keys, found)
            n_inside += inside
        if n_inside < len(lon) / 2:  # too few inside: the single-machine check looks for swapped coordinates
            check_points_inside(lon, lat, self.assign(lon, lat, regions, engine), regions, engine, where, "POIs",
                                swap_hint)
        record_poi_figures(report, len(points), n_inside, unknown, names)  # from the counts that came back
        return frame_from_array(counts.reshape(len(regions), len(names)), regions.index, names)

    def landuse_shares(self, regions: gpd.GeoDataFrame, landuse: gpd.GeoDataFrame, class_column: str) -> pd.DataFrame:
        import shapely

        plan = self._plan(regions)
        utm = regions.estimate_utm_crs()  # the whole city's zone, as on one machine
        classes = sorted(landuse[class_column].astype(str).unique())
        tree = shapely.STRtree(landuse.geometry.to_numpy())
        geoms = regions.geometry.to_numpy()
        jobs = []
        for own in plan.partitions.own:
            if not len(own):
                continue
            extent = shapely.box(*shapely.total_bounds(geoms[own]))
            chosen = np.sort(tree.query(extent, predicate="intersects"))  # file order, as the overlay sums it
            if not len(chosen):
                continue
            self.figures.parcels_sent += len(chosen)
            jobs.append((own, self._submit(_landuse_part, regions.iloc[own], landuse.iloc[chosen], class_column,
                                           utm, classes)))
        self.figures.parcels += len(landuse)
        shares = np.zeros((len(regions), len(classes)))
        for (own, _), part in zip(jobs, self._gather([f for _, f in jobs]), strict=True):
            shares[own] = part
        return frame_from_array(shares, regions.index, classes)

    def od_from_trips(self, trips: RawTable, regions: gpd.GeoDataFrame, spec: BuildSpec, report: BuildReport,
                      where: str) -> tuple[Any, pd.DataFrame | None]:
        return od_from_trips(trips, regions, spec, report, where,
                             assign=lambda lon, lat: self.assign(lon, lat, regions, spec.engine))

    def assigner(self, regions: gpd.GeoDataFrame, engine: str,
                 h3_resolution: int | None) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """A streamed file's chunks, read on the client, are joined on the workers one chunk at a time."""
        return lambda lon, lat: self.assign(lon, lat, regions, engine)

    def stream_poi_counts(self, path: Path, regions: gpd.GeoDataFrame, spec: BuildSpec,
                          categories: list[str] | dict[str, list[str]] | None, report: BuildReport,
                          h3_resolution: int | None) -> pd.DataFrame:
        """A streamed Parquet or GeoParquet POI file is read by the workers, share by share; a CSV is read here in
        chunks (its rows cannot be found without reading every byte before them) and joined on the workers."""
        if path.suffix.lower() != ".parquet":
            return super().stream_poi_counts(path, regions, spec, categories, report, h3_resolution)
        workers = max(1, len(self.client.scheduler_info().get("workers", {})))
        rows = parquet_file(path).metadata.num_rows
        # At most a chunk per share (the memory a worker's read may take), and enough shares to keep every worker
        # busy; row groups are never cut, so a file of one row group is read by one task.
        shares = parquet_shares(path, max(1, min(spec.chunk_rows, math.ceil(rows / (SHARES_IN_FLIGHT_PER_WORKER
                                                                                     * workers)))))
        column = spec.category_column or "category"

        def summaries(swap: bool) -> Iterator[PoiChunk]:
            return self._read_on_workers(path, shares, spec, column, regions, swap)

        return stream_poi_counts(path, regions, spec, categories, report, h3_resolution, shares=summaries)

    def stream_od_from_trips(self, path: Path, regions: gpd.GeoDataFrame, spec: BuildSpec, report: BuildReport,
                             h3_resolution: int | None) -> tuple[Any, pd.DataFrame | None]:
        """A streamed Parquet trip file is read by the workers, chunk by chunk; a CSV is read here in chunks and its
        trip ends joined on the workers."""
        if path.suffix.lower() != ".parquet":
            return super().stream_od_from_trips(path, regions, spec, report, h3_resolution)
        columns = table_columns(path)
        assign = self.assigner(regions, spec.engine, h3_resolution)
        counts = TripCounts(regions, spec, report, str(path), columns, assign)  # checks the columns here first
        rows = parquet_file(path).metadata.num_rows
        step = max(1, spec.chunk_rows)
        plan = self._plan(regions)
        ids = self._submit(_hold, pd.DataFrame(index=regions.index))  # trips given as region ids need them

        def submit(start: int) -> Any:
            self.figures.shares_read_on_workers += 1
            chunk = self._submit(_read_trip_chunk, str(path), start, min(start + step, rows), ids, spec, columns)
            routed = [self._submit(_route_trip_chunk, plan.router, chunk)]
            assigned = [self._submit(_assign_part, plan.halos[p], plan.partitions.halo[p], spec.engine,
                                     *self._pieces(routed, p)) for p in self._used(plan)]
            return self._submit(_count_trip_chunk, chunk, ids, spec, str(path), columns, *assigned)

        for summary in self._in_order(submit(start) for start in range(0, rows, step)):
            counts.merge(summary)
            self.figures.points_routed += 2 * (summary["n_located"])
        # Read again here only when no trip joins two regions, to tell swapped columns in the message.
        return counts.finish(lambda: table_chunks(path, spec.chunk_rows))

    def _in_order(self, futures: Iterator[Any]) -> Iterator[Any]:
        """Results of lazily submitted tasks in submission order, a few per worker in flight at a time."""
        workers = max(1, len(self.client.scheduler_info().get("workers", {})))
        pending: deque[Any] = deque()
        for future in futures:
            pending.append(future)
            if len(pending) >= SHARES_IN_FLIGHT_PER_WORKER * workers:
                yield self._gather([pending.popleft()])[0]
        while pending:
            yield self._gather([pending.popleft()])[0]

    def _read_on_workers(self, path: Path, shares: list[tuple[list[int], int]], spec: BuildSpec, column: str,
                         regions: gpd.GeoDataFrame, swap: bool) -> Iterator[PoiChunk]:
        """Chunk summaries of every share in file order, a few shares in flight at a time. Per share: one task reads
        it, one routes its points, one per partition joins the points routed there, one summarises; only the
        summary comes back."""
        plan = self._plan(regions)

        def submit(row_groups: list[int], first_row: int) -> Any:
            self.figures.shares_read_on_workers += 1
            tables = self._submit(_read_share, str(path), row_groups, first_row, spec, column, swap)
            routed = [self._submit(_route_share, plan.router, tables)]
            assigned = [self._submit(_assign_part, plan.halos[p], plan.partitions.halo[p], spec.engine,
                                     *self._pieces(routed, p)) for p in self._used(plan)]
            return self._submit(_summarise_share, tables, column, *assigned)

        for chunks in self._in_order(submit(row_groups, first_row) for row_groups, first_row in shares):
            self.figures.points_routed += sum(c.n for c in chunks)
            yield from chunks

    def assign(self, lon: np.ndarray, lat: np.ndarray, regions: gpd.GeoDataFrame, engine: str) -> np.ndarray:
        """Like :func:`~urbanprofile.data.build.join.assign_points`, joined on the workers."""
        out = np.full(len(lon), -1, dtype=np.int64)
        if not len(lon):
            return out
        plan = self._plan(regions)
        routed = self._routed(plan, np.asarray(lon, float), np.asarray(lat, float), None)
        futures = [self._submit(_assign_part, plan.halos[p], plan.partitions.halo[p], engine,
                                *self._pieces(routed, p)) for p in self._used(plan)]
        for rows, positions in self._gather(futures):
            out[rows] = positions
        return out

    # the job
    def _plan(self, regions: gpd.GeoDataFrame) -> _Plan:
        import geopandas as gpd

        if self._plan_of is not None and self._plan_of.regions is regions:
            return self._plan_of
        partitions = partition_regions(regions, self.parts, self.h3_resolution)
        geoms = regions.geometry.to_numpy()
        halos = [self._submit(_hold, gpd.GeoDataFrame(geometry=geoms[h], crs="EPSG:4326")) if len(h) else None
                 for h in partitions.halo]
        self._plan_of = _Plan(regions, partitions, self._submit(_hold, partitions.router), halos)
        self.figures.partitions = sum(len(h) > 0 for h in partitions.halo)
        if self.log is not None:
            self.log(f"distributed build: {len(regions):,} regions in {partitions.describe()}")
        return self._plan_of

    @staticmethod
    def _used(plan: _Plan) -> list[int]:
        return [p for p, h in enumerate(plan.partitions.halo) if len(h)]

    def _routed(self, plan: _Plan, lon: np.ndarray, lat: np.ndarray, payload: np.ndarray | None) -> list[Any]:
        self.figures.points_routed += len(lon)
        workers = max(1, len(self.client.scheduler_info().get("workers", {})))
        n_chunks = max(workers, math.ceil(len(lon) / ROUTE_CHUNK))
        rows = np.arange(len(lon))
        return [self._submit(_route, plan.router, chunk, lon[chunk], lat[chunk],
                             payload[chunk] if payload is not None else None)
                for chunk in np.array_split(rows, n_chunks) if len(chunk)]

    def _pieces(self, routed: list[Any], part: int) -> list[Any]:
        return [self._submit(_piece, r, part) for r in routed]

    def _submit(self, func: Callable[..., Any], *args: Any) -> Any:
        self.figures.tasks += 1
        return self.client.submit(func, *args, pure=False)

    def _gather(self, futures: list[Any]) -> list[Any]:
        """Results of tasks; a cluster that fails (every worker lost, the scheduler gone) is one line."""
        try:
            results: list[Any] = self.client.gather(futures)
        except UrbanProfileError:  # a DataError raised in a task: the input's fault, said as on one machine
            raise
        except (OSError, TimeoutError) as err:
            raise UrbanProfileError(f"the Dask cluster failed during the build ({first_line(err)}); nothing was "
                                    "written") from None
        except Exception as err:
            if type(err).__module__.startswith("distributed") or type(err).__name__ in ("KilledWorker",
                                                                                        "CancelledError"):
                raise UrbanProfileError(f"the Dask cluster failed during the build ({type(err).__name__}: "
                                        f"{first_line(err)}); nothing was written") from None
            raise
        return results


# -- the cluster and the build -----------------------------------------------------------------------
@contextmanager
def dask_client(cluster: ClusterSpec) -> Iterator[Any]:
    """A client of the scheduler at ``cluster.scheduler``, or of a local cluster of ``cluster.workers`` processes
    (one thread each) that lives as long as the block.

    Raises:
        UrbanProfileError: ``distributed`` is not installed, or no scheduler answers at the address.
    """
    distributed = require("distributed", "distributed")
    if cluster.scheduler is not None:
        try:
            client = distributed.Client(cluster.scheduler, timeout="10s")
        except (OSError, TimeoutError, ValueError) as err:
            raise UrbanProfileError(f"--scheduler {cluster.scheduler}: no Dask scheduler answers there "
                                    f"({first_line(err)})") from None
        try:
            yield client
        finally:
            client.close()
        return
    local = distributed.LocalCluster(n_workers=cluster.workers, threads_per_worker=1, processes=True,
                                     dashboard_address=":0", silence_logs=logging.ERROR)
    try:
        with distributed.Client(local) as client:
            yield client
    finally:
        local.close()


def build_dataset_distributed(
    spec: BuildSpec, out: str | Path, cluster: ClusterSpec | None = None, client: Any = None,
    overwrite: bool = False, progress: bool = False, command: str | None = None,
    log: Callable[[str], None] | None = None,
) -> BuildReport:
    """:func:`~urbanprofile.data.build.pipeline.build_dataset` with the joins as a partitioned job on a Dask cluster.

    The folder is the one the single-machine build writes (every view, region order, label and manifest entry;
    only the timings differ), written beside and renamed into place when every partition is done. A worker lost
    mid-build has its partitions rerun on the others by Dask.

    Args:
        spec: What to read and how.
        out: Folder to create.
        cluster: Where to run and how many partitions (default: a local cluster of 2 processes, 16 partitions).
        client: A connected ``distributed.Client`` to use instead of starting one (``cluster.parts`` still counts).
        overwrite, progress, command, log: As for ``build_dataset``.

    Raises:
        DataError: As ``build_dataset``.
        UrbanProfileError: The cluster cannot be reached or fails during the build (nothing is written).
    """
    cluster = cluster or ClusterSpec()
    cluster.check()
    spec.check()
    check_output(Path(out).expanduser(), overwrite)  # before a cluster is started
    h3_resolution = spec.h3_resolution if spec.boundary is not None else None
    if client is not None:
        joiner = DaskJoiner(client, cluster.parts, h3_resolution, log)
        return build_dataset(spec, out, overwrite=overwrite, progress=progress, command=command, log=log,
                             joiner=joiner)
    with dask_client(cluster) as started:
        joiner = DaskJoiner(started, cluster.parts, h3_resolution, log)
        return build_dataset(spec, out, overwrite=overwrite, progress=progress, command=command, log=log,
                             joiner=joiner)
