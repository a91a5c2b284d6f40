"""A build of H3 regions whose memory does not follow the number of cells: cells as integers, partitions by parent.

The in-memory and streamed builds hold a shapely polygon per cell (about 0.8 KB) and an index over them for the
whole build: 1.2 GB per million cells. Here the regions are a sorted ``uint64`` array of H3 cells (8 bytes each)
and nothing else per cell is kept:

- *Cutting*: the boundary is covered by H3 parents :data:`PARENT_STEPS` resolutions coarser (at most 16,807
  children each); one parent at a time, its children are made polygons (``h3_fast``) and kept where they
  intersect the boundary, and the kept ones are written to ``regions.parquet`` at once, one row group per
  :data:`WRITE_CELLS` cells. Children of a parent are consecutive in integer order, and the integer order of cells
  of one resolution is the order of their id strings, so the file holds the rows of today's build in its order.
- *Joining points* (:class:`H3Assigner`): a point's H3 cell comes from h3; it is kept when the point lies clearly
  inside the cell's polygon (the edge test of :class:`~urbanprofile.data.build.join.RegionJoiner`, on h3's
  vertices of the cells of the batch); the few others (on or next to a border, or in a cell that is no region)
  are tested against the polygons of their cell and its six neighbours, and go to the first region (in region
  order) whose polygon holds them, as the index over every polygon gives them today. A straight-edged cell
  polygon differs from the cell by far less than a cell, so no other polygon can hold the point.
- *Counting*: POI counts per (cell position, raw category) and trips per (origin, destination) pair are kept
  sparse, as in the streamed build, and written partition block by partition block (``poi_counts.parquet`` in row
  groups of :data:`WRITE_CELLS` regions).

The folder is the one the other engines write for the same inputs (the loaders read it as it is): the same files,
columns, rows and values; files are written in row groups, so they are equal as read, not byte for byte.
Everything is written into a folder beside the target and renamed into place at the end, so a failure leaves
nothing half-written. What this engine does not do (land use, labels, polygon regions, centre-only cells, trips
given as region ids) keeps the other engines: ``--engine auto`` chooses it only where it applies.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from urbanprofile.data.build.aggregate import record_poi_figures
from urbanprofile.data.build.h3_fast import cell_boundaries, cell_centres, cell_polygons
from urbanprofile.data.build.join import _EDGE_BATCH, _EDGE_MARGIN
from urbanprofile.data.build.regions import h3_cell_estimate, read_boundary
from urbanprofile.data.build.spec import BuildReport, BuildSpec
from urbanprofile.data.build.steps import UNITS, Steps, load_categories, source_of
from urbanprofile.data.build.streaming import (
    _CategoryCounts,
    can_stream,
    count_poi_chunks,
    table_chunks,
    table_columns,
)
from urbanprofile.data.build.trips import TripCounts, trip_columns
from urbanprofile.data.city import SPARSE_VIEW_ABOVE
from urbanprofile.data.io import building_folder, first_line, replace_folder
from urbanprofile.data.loaders.built import FORMAT, FORMAT_VERSION, MANIFEST, MAX_DENSE_PATTERN_CELLS, check_output
from urbanprofile.errors import DataError, UrbanProfileError, require

if TYPE_CHECKING:
    import geopandas as gpd
    import pyarrow as pa
    import pyarrow.parquet as pq


#: Parents are at most this many resolutions coarser than the cells (7**5 = 16,807 children per parent).
PARENT_STEPS = 5
#: A small boundary takes finer parents, so that about this many cover it (the children of the parents along
#: the border are all cut, so large parents over a small boundary would cut mostly cells outside it).
MIN_PARENTS = 64
#: Cells per row group of the files written (and per batch of polygons held while writing regions).
WRITE_CELLS = 250_000
#: The folder of spilled counts inside the folder being built (removed before it is renamed into place).
_SPILL = ".spill"
#: Boundaries this close (degrees) to the antimeridian or a pole are left to the other engines (:func:`near_seams`).
SEAM_DEGREES = 2.0
#: ``--engine auto`` takes this engine from this many estimated cells (see docs/scale-out.md for the measurement).
PARTITIONED_ABOVE_CELLS = 100_000


def unsupported(spec: BuildSpec) -> str | None:
    """Why this engine cannot build ``spec`` (``None`` when it can): what it leaves to the other engines."""
    if spec.boundary is None or spec.h3_resolution is None:
        return "it builds H3 cells from --boundary, not --regions polygons"
    if not spec.h3_cover:
        return "it keeps every cell overlapping the boundary (not --h3-centres-only)"
    if spec.landuse is not None:
        return "it does not overlay land use (--landuse)"
    if spec.labels is not None or spec.label_columns is not None:
        return "it does not match labels (--labels)"
    for name, path in (("POI", spec.pois), ("trip", spec.trips)):
        if path is not None and not can_stream(Path(path)):
            return f"it streams CSV, Parquet and GeoParquet {name} files, not {Path(path).name}"
    if spec.trips is not None:
        ends = list(spec.trip_columns) if spec.trip_columns else trip_columns(table_columns(Path(spec.trips)),
                                                                              str(spec.trips))
        if len(ends) == 2:
            return "it joins trips by their coordinates, not by region ids"
    return None


def use_partitioned(spec: BuildSpec, joiner: object | None = None) -> bool:
    """Whether ``build`` takes this engine: when asked (``--engine partitioned``), or with ``auto`` where it applies
    and the boundary is estimated at :data:`PARTITIONED_ABOVE_CELLS` cells or more.

    Raises:
        DataError: ``--engine partitioned`` for a build it cannot do, or with a cluster (``--workers``).
    """
    if spec.build_engine not in ("auto", "partitioned"):
        return False
    spec.check()
    reason = unsupported(spec)
    if spec.build_engine == "partitioned":
        if reason is not None:
            raise DataError(f"--engine partitioned: {reason}; use --engine auto")
        if joiner is not None:
            raise DataError("--engine partitioned runs in one process; leave out --workers/--scheduler")
        return True
    if reason is not None or joiner is not None:
        return False
    assert spec.boundary is not None and spec.h3_resolution is not None
    boundary = read_boundary(spec.boundary, spec.crs)
    if near_seams(boundary):
        return False
    return h3_cell_estimate(boundary, spec.h3_resolution, spec.h3_cover) >= PARTITIONED_ABOVE_CELLS


def near_seams(boundary: gpd.GeoDataFrame) -> bool:
    """Whether a boundary comes within :data:`SEAM_DEGREES` of the antimeridian or a pole, where a cell's
    straight-edged polygon in longitude and latitude is not close to the cell (it may wrap around the globe), so
    a point may lie in a polygon that is no neighbour of its cell; the polygon index of the other engines is kept
    there."""
    west, south, east, north = boundary.to_crs("EPSG:4326").total_bounds
    return bool(west < -180 + SEAM_DEGREES or east > 180 - SEAM_DEGREES or south < -90 + SEAM_DEGREES
                or north > 90 - SEAM_DEGREES)


# -- cutting ------------------------------------------------------------------------------------------------------
def parent_steps(estimate: int) -> int:
    """How many resolutions coarser the parents of a boundary of about ``estimate`` cells are (1 to
    :data:`PARENT_STEPS`): about :data:`MIN_PARENTS` parents or more."""
    return max(1, min(PARENT_STEPS, int(math.log(max(estimate, 1) / MIN_PARENTS, 7)) if estimate > MIN_PARENTS
                      else 1))


def parent_cells(shape: Any, resolution: int, steps: int = PARENT_STEPS) -> np.ndarray:
    """Sorted parents (``resolution - steps``, at least 0) whose children may overlap ``shape``: the parents
    overlapping it and one ring around them (a child may reach a little past its parent's polygon)."""
    import shapely
    from h3.api import basic_int as h3i

    coarse = max(0, resolution - steps)
    found = np.fromiter(h3i.geo_to_cells(shape, coarse), dtype=np.uint64)
    if not len(found):  # a boundary smaller than one parent
        point = shape.representative_point()
        found = np.array([h3i.latlng_to_cell(point.y, point.x, coarse)], dtype=np.uint64)
    found = np.unique(found)
    frontier = found
    shapely.prepare(shape)
    while len(frontier):  # grow while neighbouring parents still overlap the boundary
        near = np.fromiter(chain.from_iterable(h3i.grid_disk(int(c), 1) for c in frontier.tolist()), dtype=np.uint64)
        ring = np.setdiff1d(np.unique(near), found, assume_unique=True)
        frontier = ring[shapely.intersects(cell_polygons(ring), shape)]
        found = np.union1d(found, frontier)
    near = np.fromiter(chain.from_iterable(h3i.grid_disk(int(c), 1) for c in found.tolist()), dtype=np.uint64)
    return np.unique(near)


def cover_partitions(shape: Any, resolution: int, steps: int = PARENT_STEPS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The cells of ``resolution`` overlapping ``shape``, parent by parent in integer order: each parent's kept
    cells (sorted ``uint64``) and their polygons."""
    import shapely
    from h3.api import numpy_int

    for parent in parent_cells(shape, resolution, steps).tolist():
        children = np.sort(np.asarray(numpy_int.cell_to_children(parent, resolution), dtype=np.uint64))
        polygons = cell_polygons(children)
        keep = shapely.intersects(polygons, shape)
        if keep.any():
            yield children[keep], polygons[keep]


def cell_strings(cells: np.ndarray) -> list[str]:
    """H3 id strings of ``uint64`` cells (lower-case hex, as h3 writes them)."""
    return [format(c, "x") for c in cells.tolist()]


# -- joining points -----------------------------------------------------------------------------------------------
class H3Assigner:
    """Region positions of points for H3 cell regions given as a sorted ``uint64`` array, with the answers of
    :class:`~urbanprofile.data.build.join.RegionJoiner` (see the module docstring), holding no polygon per region.

    Args:
        cells: The regions, sorted.
        resolution: Their resolution.
    """

    def __init__(self, cells: np.ndarray, resolution: int) -> None:
        self.cells = cells
        self.resolution = resolution

    def positions(self, cells: np.ndarray) -> np.ndarray:
        """The position of each cell among the regions, -1 where it is none."""
        if not len(self.cells):
            return np.full(len(cells), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.cells, cells), len(self.cells) - 1)
        return np.where(self.cells[at] == cells, at, -1).astype(np.int64)

    def assign(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """The position (0..N-1) of the region each point falls in, or -1 outside every region."""
        valid = (np.abs(lat) <= 90) & (np.abs(lon) <= 180)  # h3 refuses others; no region holds them
        cells = np.zeros(len(lon), dtype=np.uint64)
        if valid.any():
            cells[valid] = cells_of_points(lon[valid], lat[valid], self.resolution)
        position = np.where(valid, self.positions(cells), -1)
        found = np.flatnonzero(position >= 0)
        found = found[np.argsort(cells[found], kind="stable")]  # a cell's vertices are then taken once per chunk
        sure = np.zeros(len(lon), dtype=bool)
        for start in range(0, len(found), _EDGE_BATCH):
            part = found[start:start + _EDGE_BATCH]
            sure[part] = clearly_inside(cells[part], lon[part], lat[part])
        rest = np.flatnonzero(valid & ~sure)
        if len(rest):
            position[rest] = self._near(cells[rest], lon[rest], lat[rest])
        return position

    def _near(self, cells: np.ndarray, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """Positions of points judged by polygons: the first region among each point's cell and its neighbours
        whose polygon intersects the point (-1 if none)."""
        import shapely
        from h3.api import basic_int

        disks = [basic_int.grid_disk(c, 1) for c in cells.tolist()]
        point = np.repeat(np.arange(len(cells)), [len(d) for d in disks])
        candidate = self.positions(np.fromiter(chain.from_iterable(disks), dtype=np.uint64, count=len(point)))
        point, candidate = point[candidate >= 0], candidate[candidate >= 0]
        out = np.full(len(cells), -1, dtype=np.int64)
        if not len(point):
            return out
        unique, at = np.unique(candidate, return_inverse=True)
        polygons = cell_polygons(self.cells[unique])
        hit = shapely.intersects(polygons[at], shapely.points(lon[point], lat[point]))
        first = np.full(len(cells), len(self.cells), dtype=np.int64)
        np.minimum.at(first, point[hit], candidate[hit])  # a point on a shared border goes to the first region
        return np.where(first < len(self.cells), first, -1)


def cells_of_points(lon: np.ndarray, lat: np.ndarray, resolution: int) -> np.ndarray:
    """The H3 cell (``uint64``) of each point (valid coordinates only): h3ronpy's vectorised ``latlng_to_cell``
    where installed (about 1 µs a point instead of 2 to 3 with a Python call each), else h3's.

    Only a first guess: a point is kept in this cell only if it lies clearly inside the cell's polygon (h3's
    vertices), and is otherwise judged against the polygons of the cell and its neighbours, so a point on which
    two implementations of H3 disagree (on a cell border, to the last bit) ends in the same region either way.
    """
    try:
        from h3ronpy.vector import coordinates_to_cells
    except ImportError:
        require("h3", "build")
        from h3.api import basic_int

        cell_of = np.frompyfunc(lambda y, x: basic_int.latlng_to_cell(y, x, resolution), 2, 1)
        return np.asarray(cell_of(lat, lon), dtype=np.uint64)
    found = coordinates_to_cells(np.ascontiguousarray(lat, dtype=float), np.ascontiguousarray(lon, dtype=float),
                                 resolution)
    return np.asarray(found.to_numpy(), dtype=np.uint64)


def clearly_inside(cells: np.ndarray, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Whether each point lies clearly inside its cell's polygon, by the arithmetic of
    :meth:`~urbanprofile.data.build.join.RegionJoiner._clearly_inside` on h3's vertices of the cells (the vertices
    of their polygons); the others are judged by polygons."""
    unique, at = np.unique(cells, return_inverse=True)
    coords, counts = cell_boundaries(unique)
    k = int(counts.max())
    owner = np.repeat(np.arange(len(unique)), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(len(coords)) - first[owner]
    following = np.where(slot == counts[owner] - 1, first[owner], np.arange(len(coords)) + 1)  # the ring closes
    start = np.zeros((len(unique), k, 2))
    end = np.zeros((len(unique), k, 2))
    valid = np.zeros((len(unique), k), dtype=bool)
    start[owner, slot] = coords
    end[owner, slot] = coords[following]
    valid[owner, slot] = True
    orientation = np.sign(np.sum(start[..., 0] * end[..., 1] - end[..., 0] * start[..., 1], axis=1))
    a, b = start[at], end[at]
    cross = ((b[..., 0] - a[..., 0]) * (lat[:, None] - a[..., 1])
             - (b[..., 1] - a[..., 1]) * (lon[:, None] - a[..., 0])) * orientation[at][:, None]
    return np.all((cross > _EDGE_MARGIN) | ~valid[at], axis=1)


# -- writing ------------------------------------------------------------------------------------------------------
class _RowGroups:
    """One Parquet file written a row group at a time (the schema of the first)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _Spill:
    """Records appended to one file per block of :data:`WRITE_CELLS` regions, read back block by block: what
    keeps a count's memory to one block of regions, not the country."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype | type) -> None:
        self.folder, self.name, self.dtype = folder, name, np.dtype(dtype)
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, block: int) -> Path:
        return self.folder / f"{self.name}-{block:06d}.bin"

    def add(self, position: np.ndarray, records: np.ndarray) -> None:
        """Append ``records`` to the files of the blocks of their region ``position``."""
        block = position // WRITE_CELLS
        order = np.argsort(block, kind="stable")
        block, records = block[order], records[order]
        found, first = np.unique(block, return_index=True)
        for b, lo, hi in zip(found.tolist(), first.tolist(), [*first[1:].tolist(), len(block)], strict=True):
            with self.path(b).open("ab") as handle:
                records[lo:hi].tofile(handle)

    def read(self, block: int) -> np.ndarray:
        path = self.path(block)
        return np.fromfile(path, dtype=self.dtype) if path.exists() else np.zeros(0, dtype=self.dtype)


class _SpilledPOIs(_CategoryCounts):
    """POI counts whose (position, raw category) keys go to disk by block of regions (see :class:`_Spill`)."""

    def __init__(self, spill: _Spill) -> None:
        super().__init__()
        self.spill = spill

    def keep(self, keys: np.ndarray, n: np.ndarray) -> None:
        points = np.repeat(keys, n)  # one record per point, as the block is counted when it is written
        self.spill.add(points >> 32, points)


#: A trip with both ends in a region, as spilled: origin and destination positions, time pattern, trips.
_TRIP = np.dtype([("o", "<i8"), ("d", "<i8"), ("p", "<i8"), ("w", "<f8")])


class _SpilledTrips(TripCounts):
    """Trip counts whose rows go to disk by block of origins (see :class:`_Spill`)."""

    def __init__(self, spill: _Spill, *args: Any) -> None:
        super().__init__(*args)
        self.spill = spill

    def keep(self, origin: np.ndarray, dest: np.ndarray, pattern: np.ndarray | None, weights: np.ndarray) -> None:
        records = np.empty(len(origin), dtype=_TRIP)
        records["o"], records["d"], records["w"] = origin, dest, weights
        records["p"] = -1 if pattern is None else pattern
        self.spill.add(origin, records)


def _region_table(cells: np.ndarray, polygons: np.ndarray) -> pa.Table:
    """Rows of ``regions.parquet`` as the other engines write them (``region_id``, ``lon``, ``lat``, geometry)."""
    import geopandas as gpd
    from geopandas.io.arrow import _geopandas_to_arrow

    lon, lat = cell_centres(cells)
    ids = pd.Index(cell_strings(cells), name="region_id", dtype=str)
    frame = gpd.GeoDataFrame({"lon": lon, "lat": lat}, index=ids, geometry=polygons, crs="EPSG:4326").reset_index()
    table = _geopandas_to_arrow(frame, index=False)
    geo = json.loads(table.schema.metadata[b"geo"])
    for column in geo["columns"].values():
        column.pop("bbox", None)  # this row group's extent, not the file's
    return table.replace_schema_metadata({**table.schema.metadata, b"geo": json.dumps(geo).encode()})


def _frame_table(frame: pd.DataFrame) -> pa.Table:
    import pyarrow as pa

    return pa.Table.from_pandas(frame, preserve_index=False)


class _Bounds:
    """The regions' extent as the messages about points that miss them give it (``total_bounds``)."""

    def __init__(self) -> None:
        self.total_bounds = np.array([np.inf, np.inf, -np.inf, -np.inf])

    def add(self, polygons: np.ndarray) -> None:
        import shapely

        box = shapely.total_bounds(polygons)
        self.total_bounds = np.concatenate([np.minimum(self.total_bounds[:2], box[:2]),
                                            np.maximum(self.total_bounds[2:], box[2:])])


def _cut(spec: BuildSpec, folder: Path, report: BuildReport, bounds: _Bounds) -> np.ndarray:
    """Cut the boundary into cells, writing ``regions.parquet``; the cells, sorted."""
    assert spec.boundary is not None and spec.h3_resolution is not None
    boundary = read_boundary(spec.boundary, spec.crs)
    if near_seams(boundary):
        raise DataError(f"{spec.boundary}: --engine partitioned: the boundary comes within {SEAM_DEGREES:g} degrees "
                        "of the antimeridian or a pole, where cell polygons wrap; use --engine auto")
    resolution = spec.h3_resolution
    estimate = h3_cell_estimate(boundary, resolution, spec.h3_cover)
    if estimate > spec.max_cells:
        raise DataError(f"{spec.boundary}: about {estimate:,} H3 cells at resolution {resolution}, more than "
                        f"--max-cells {spec.max_cells:,}; use a coarser --h3-res, or raise --max-cells if you mean it")
    shape = boundary.to_crs("EPSG:4326").geometry.make_valid().union_all()
    if shape.is_empty:
        raise DataError(f"the boundary holds no H3 cell centre at resolution {resolution} (try a finer --h3-res)")
    writer = _RowGroups(folder / "regions.parquet")
    parts: list[np.ndarray] = []
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    try:
        def flush() -> None:
            cells = np.concatenate([c for c, _ in pending])
            polygons = np.concatenate([p for _, p in pending])
            writer.write(_region_table(cells, polygons))
            bounds.add(polygons)
            pending.clear()

        held = 0
        for cells, polygons in cover_partitions(shape, resolution, parent_steps(estimate)):
            parts.append(cells)
            pending.append((cells, polygons))
            held += len(cells)
            if held >= WRITE_CELLS:
                flush()
                held = 0
        if pending:
            flush()
    finally:
        writer.close()
    if not parts:
        raise DataError(f"the boundary holds no H3 cell centre at resolution {resolution} (try a finer --h3-res)")
    return np.concatenate(parts)


def _write_poi_counts(path: Path, cells: np.ndarray, spill: _Spill, codes: np.ndarray, names: list[str]) -> None:
    """``poi_counts.parquet``: one row per region (zeros included), a row group per block of regions."""
    writer = _RowGroups(path)
    try:
        for block, start in enumerate(range(0, len(cells), WRITE_CELLS)):
            stop = min(start + WRITE_CELLS, len(cells))
            keys, n = np.unique(spill.read(block), return_counts=True)
            out = np.zeros((stop - start, len(names)), dtype=np.int64)
            np.add.at(out, ((keys >> 32) - start, codes[keys & 0xFFFFFFFF]), n)
            frame = pd.DataFrame(out, columns=[str(c) for c in names])
            frame.insert(0, "region_id", pd.Index(cell_strings(cells[start:stop]), dtype=str))
            writer.write(_frame_table(frame))
    finally:
        writer.close()


def _write_trips(folder: Path, cells: np.ndarray, spill: _Spill, dtype: np.dtype, n_patterns: int | None) -> None:
    """``od_flows.parquet`` (rows by origin, then destination) and, with times, ``od_patterns.parquet`` (by
    pattern, origin, destination; a small city's by origin, pattern, destination, as its view is written), the
    rows of the other engines, a row group per block of origins (and pattern)."""
    n = len(cells)
    n_blocks = (n + WRITE_CELLS - 1) // WRITE_CELLS

    def ids(positions: np.ndarray) -> np.ndarray:
        return np.asarray(cell_strings(cells[positions]), dtype=object)

    def sums(key: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        unique, at = np.unique(key, return_inverse=True)
        return unique, np.bincount(at, weights=weights, minlength=len(unique)).astype(dtype)

    flows = _RowGroups(folder / "od_flows.parquet")
    try:
        for block in range(n_blocks):
            records = spill.read(block)
            key, total = sums(records["o"] * n + records["d"], records["w"])
            keep = total.astype(float) != 0  # the writer takes the matrix as float, without zeros
            flows.write(_frame_table(pd.DataFrame({"origin": ids(key[keep] // n), "destination": ids(key[keep] % n),
                                                   "value": total[keep].astype(float)})))
    finally:
        flows.close()
    if n_patterns is None:
        return
    patterns = _RowGroups(folder / "od_patterns.parquet")
    small = n <= SPARSE_VIEW_ABOVE and n_patterns * n ** 2 <= MAX_DENSE_PATTERN_CELLS
    try:
        for pattern in [None] if small else range(n_patterns):  # a large city: one pass over the blocks per pattern
            for block in range(n_blocks):
                records = spill.read(block)
                if pattern is not None:
                    records = records[records["p"] == pattern]
                p, o, d = records["p"], records["o"], records["d"]
                # A small city's patterns are a view the writer lists origin by origin, without zeros.
                key, total = sums((o * n_patterns + p) * n + d if small else (p * n + o) * n + d, records["w"])
                if small:
                    o, rest = key // (n_patterns * n), key % (n_patterns * n)
                    p, d = rest // n, rest % n
                    keep = total != 0
                else:
                    p, o, d = key // (n * n), (key // n) % n, key % n
                    keep = np.ones(len(key), dtype=bool)
                patterns.write(_frame_table(pd.DataFrame({"pattern": p[keep], "origin": ids(o[keep]),
                                                          "destination": ids(d[keep]), "trips": total[keep]})))
    finally:
        patterns.close()


def build_partitioned(
    spec: BuildSpec, out: str | Path, overwrite: bool = False, progress: bool = False, command: str | None = None,
    log: Callable[[str], None] | None = None,
) -> BuildReport:
    """Build a dataset folder of H3 cells partition by partition (see the module docstring).

    Args:
        spec: What to read and how (H3 cells from a boundary; POIs and trips by coordinates).
        out, overwrite, progress, command, log: As for :func:`~urbanprofile.data.build.pipeline.build_dataset`.

    Raises:
        DataError: As :func:`~urbanprofile.data.build.pipeline.build_dataset`; nothing is written then.
    """

    start = time.perf_counter()
    spec.check()
    reason = unsupported(spec)
    if reason is not None:
        raise UrbanProfileError(f"--engine partitioned: {reason}")
    assert spec.boundary is not None and spec.h3_resolution is not None
    target = Path(out).expanduser()
    check_output(target, overwrite)
    for given in (spec.pois, spec.trips, spec.boundary):
        if given is not None and Path(given).exists() and Path(given).resolve().is_relative_to(target.resolve()):
            raise DataError(f"{given}: an input lies inside the output folder {target}, which the build replaces; "
                            "choose another --out")
    categories = load_categories(spec.categories)
    report = BuildReport(city=spec.city, join_engine=spec.engine, region_kind="h3")
    steps = Steps(2 + (spec.pois is not None) + (spec.trips is not None), progress, report, log)
    tmp: Path | None = None
    try:
        tmp = building_folder(target)
        manifest = _build_into(spec, tmp, report, steps, categories, UNITS, source_of)
        with steps.step("write", "writing the manifest"):
            spec_record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(spec).items()
                           if v is not None}
            manifest.update({
                "build_command": command or f"urbanprofile.data.build.build_dataset(BuildSpec(**{spec_record!r}))",
                "build_spec": spec_record,
                "n_time_patterns": spec.n_time_patterns,
                "notes": report.warnings(),
            })
            report.seconds["total"] = round(time.perf_counter() - start, 3)
            report.output = str(target)
            manifest["report"] = report.to_dict()
            units = manifest.pop("units")
            manifest["units"] = units  # last, as the other engines order the manifest
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
            check_output(target, overwrite)  # again: minutes may have passed
            replace_folder(tmp, target)
    except OSError as err:  # a full disk, a read-only location: nothing is left behind
        raise DataError(f"{target}: cannot write the dataset ({err.strerror or first_line(err)})") from None
    finally:
        steps.close()
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return report


def _build_into(spec: BuildSpec, folder: Path, report: BuildReport, steps: Steps,
                categories: list[str] | dict[str, list[str]] | None, units_of: dict[str, str],
                source: Callable[[Path | str], dict[str, Any]]) -> dict[str, Any]:
    """Write every file of the dataset into ``folder``; the manifest without its last keys."""
    import shapely

    assert spec.boundary is not None and spec.h3_resolution is not None
    resolution = spec.h3_resolution
    sources: dict[str, Any] = {}
    views: dict[str, Any] = {}
    bounds = _Bounds()
    with steps.step("regions", "cutting and writing H3 cells"):
        boundary = read_boundary(spec.boundary, spec.crs)
        report.h3_cells_estimate = h3_cell_estimate(boundary, resolution, spec.h3_cover)
        steps.log(f"H3 resolution {resolution} over {spec.boundary}: about {report.h3_cells_estimate:,} cells "
                  f"(limit --max-cells {spec.max_cells:,}); partitioned engine")
        cells = _cut(spec, folder, report, bounds)
        report.n_regions = len(cells)
        sources["boundary"] = source(spec.boundary)
    extent = _extent(bounds, shapely)
    assign = H3Assigner(cells, resolution).assign
    units: dict[str, str] = {}
    if spec.pois is not None:
        with steps.step("pois", f"joining POIs to {len(cells)} regions (partitioned)"):
            path = Path(spec.pois)
            report.read_engines["pois"] = "partitioned"
            spill = _Spill(folder / _SPILL, "pois", np.int64)
            counts = count_poi_chunks(path, extent, spec, report, assign, _SpilledPOIs(spill))
            codes, names, unknown = counts.categories(categories)
            record_poi_figures(report, counts.n_points, counts.n_inside, unknown, names)
            _write_poi_counts(folder / "poi_counts.parquet", cells, spill, codes, names)
            views["poi_counts"] = {"file": "poi_counts.parquet", "layout": "dense",
                                   "columns": [str(c) for c in names], "units": units_of["poi_counts"]}
            units["poi_counts"] = units_of["poi_counts"]
            sources["pois"] = source(path)
    if spec.trips is not None:
        with steps.step("trips", "assigning trips to regions (partitioned)"):
            path = Path(spec.trips)
            report.read_engines["trips"] = "partitioned"
            spill = _Spill(folder / _SPILL, "trips", _TRIP)
            trips = _SpilledTrips(spill, extent, spec, report, str(path), table_columns(path), assign)
            for raw in table_chunks(path, spec.chunk_rows):
                trips.add(raw)
            dtype = trips.check(lambda: table_chunks(path, spec.chunk_rows))
            timed = trips.time_column is not None
            _write_trips(folder, cells, spill, dtype, spec.n_time_patterns if timed else None)
            views["od_flows"] = {"file": "od_flows.parquet", "layout": "sparse", "units": units_of["od_flows"]}
            units["od_flows"] = units_of["od_flows"]
            if timed:
                views["od_patterns"] = {"file": "od_patterns.parquet", "layout": "patterns",
                                        "n_patterns": spec.n_time_patterns, "units": units_of["od_patterns"]}
                units["od_patterns"] = units_of["od_patterns"]
            sources["trips"] = source(path)
    shutil.rmtree(folder / _SPILL, ignore_errors=True)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "name": f"built-{spec.city}",
        "created": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
        "crs": "EPSG:4326",
        "regions": {"file": "regions.parquet", "count": len(cells), "id_kind": "h3", "id_dtype": "str",
                    "h3_resolution": resolution},
        "views": views,
        "labels": None,
        "protocol": {"paper_folds": {"n_splits": 10, "shuffle": True, "random_state": 2024}, "drop_zero": []},
        "city": spec.city,
        "units": units,
        "sources": sources,
    }


def _extent(bounds: _Bounds, shapely: Any) -> gpd.GeoSeries:
    """The regions' extent as a one-box series (what messages about points that miss the regions read)."""
    import geopandas as gpd

    return gpd.GeoSeries([shapely.box(*bounds.total_bounds)], crs="EPSG:4326")
