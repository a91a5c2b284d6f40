"""Out-of-core builds: large POI and trip files read and joined in chunks, so memory follows the chunk, not the file.

A streamed build reads CSV, Parquet and GeoParquet files in chunks of ``chunk_rows`` rows, assigns each chunk's
points to regions (H3 cells straight from h3, polygons through one spatial index built once) and keeps only what
is not zero: counts per (region, raw category) for POIs, trips per (origin, destination) and per (time pattern,
origin, destination) for trips. Chunks go through the same readers, category mapping and trip rules as the
in-memory build, so both give the same dataset; :func:`choose_engine` picks one by file size."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from urbanprofile.data.build.aggregate import map_categories, record_poi_figures
from urbanprofile.data.build.join import RegionJoiner, refuse_points_outside
from urbanprofile.data.build.messages import listed, span
from urbanprofile.data.build.osm import is_osm_extract
from urbanprofile.data.build.points import PointTable, has_geo_metadata, points_from_table, points_from_vector
from urbanprofile.data.build.spec import STREAMING_ABOVE_BYTES, BuildReport, BuildSpec
from urbanprofile.data.build.trips import TripCounts
from urbanprofile.data.city import frame_from_array
from urbanprofile.data.io import TABLE_SUFFIXES, RawTable, first_line, vector_in_degrees
from urbanprofile.errors import DataError

if TYPE_CHECKING:
    import geopandas as gpd
    import pyarrow.parquet as pq

#: Bytes read at a time when scanning a CSV for quotes.
_SCAN_BYTES = 1 << 26


def can_stream(path: Path) -> bool:
    """Whether a file can be streamed: CSV/TSV, Parquet or GeoParquet (not OSM, GeoPackage, shapefile)."""
    return not is_osm_extract(path) and (path.suffix.lower() in TABLE_SUFFIXES or path.suffix.lower() == ".parquet")


def choose_engine(spec: BuildSpec, path: Path) -> str:
    """``memory`` or ``streaming`` for a POI or trip file: as asked, or by file size with ``auto``.

    Raises:
        DataError: Streaming is asked for a format that cannot be streamed.
    """
    if spec.build_engine == "memory":
        return "memory"
    if spec.build_engine == "streaming":
        if not can_stream(path):
            raise DataError(f"{path}: --engine streaming reads CSV, Parquet and GeoParquet files; this one is read "
                            "in memory (use --engine memory or auto)")
        return "streaming"
    return "streaming" if can_stream(path) and path.stat().st_size >= STREAMING_ABOVE_BYTES else "memory"


# -- reading in chunks --------------------------------------------------------------------------------------------
def _csv_has_quotes(path: Path) -> bool:
    with path.open("rb") as handle:
        return any(b'"' in block for block in iter(lambda: handle.read(_SCAN_BYTES), b""))


def _unquoted_csv_chunks(path: Path, delimiter: str, chunk_rows: int) -> Iterator[RawTable]:
    """Chunks of an unquoted CSV, with the file line of each row and the lines of malformed rows, as
    :func:`urbanprofile.data.io.read_raw_table` gives them for the whole file (records are lines)."""
    sep = ord(delimiter)
    with path.open("rb") as handle:
        header = handle.readline()
        if not header.strip(b"\r\n"):
            raise DataError(f"{path}: empty file (no header line)")
        n_header = header.count(delimiter.encode()) + 1
        if not header.endswith(b"\n"):
            header += b"\n"
        next_line = 2
        carry = b""
        while True:
            block = handle.readlines(max(1, chunk_rows) * 64)  # a size hint: whole lines, about chunk_rows of them
            if not block and not carry:
                return
            data = carry + b"".join(block)
            carry = b""
            buf = np.frombuffer(data, dtype=np.uint8)
            ends = np.flatnonzero(buf == ord("\n"))
            if not len(ends) or ends[-1] != len(buf) - 1:
                ends = np.append(ends, len(buf))  # the last line of the file has no line break
            starts = np.concatenate([[0], ends[:-1] + 1])
            carriage = (ends > starts) & (buf[np.maximum(ends - 1, 0)] == ord("\r"))
            fields = np.bincount(np.searchsorted(ends, np.flatnonzero(buf == sep)), minlength=len(ends)) + 1
            blank = (ends - starts - carriage) == 0
            numbers = next_line + np.arange(len(ends))
            next_line += len(ends)
            good = ~blank & (fields == n_header)
            malformed = numbers[~blank & ~good].tolist()
            keep = np.repeat(good, np.minimum(ends + 1, len(buf)) - starts)
            text = header + buf[keep].tobytes()
            try:
                frame = pd.read_csv(io.BytesIO(text), sep=delimiter, dtype=str, keep_default_na=False)
            except Exception as err:  # decoding and parsing raise many types for a corrupt file
                raise DataError(f"{path}: cannot read table ({first_line(err)})") from None
            yield RawTable(path, frame, numbers[good], malformed)


def _quoted_csv_chunks(path: Path, delimiter: str, chunk_rows: int) -> Iterator[RawTable]:
    """Chunks of a CSV with quoted fields (a record may span lines), read with the csv module."""
    try:
        columns = pd.read_csv(path, sep=delimiter, dtype=str, nrows=0).columns
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            if next(reader, None) is None:
                raise DataError(f"{path}: empty file (no header line)")
            rows: list[list[str]] = []
            lines: list[int] = []
            malformed: list[int] = []
            start = reader.line_num + 1
            for record in reader:
                if record:  # blank lines are skipped, as pandas does
                    if len(record) == len(columns):
                        rows.append(record)
                        lines.append(start)
                    else:
                        malformed.append(start)
                start = reader.line_num + 1
                if len(rows) >= chunk_rows:
                    yield RawTable(path, pd.DataFrame(rows, columns=columns, dtype=str), np.asarray(lines), malformed)
                    rows, lines, malformed = [], [], []
    except (csv.Error, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise DataError(f"{path}: cannot read table ({first_line(err)})") from None
    if rows or malformed:
        yield RawTable(path, pd.DataFrame(rows, columns=columns, dtype=str), np.asarray(lines, dtype=np.int64),
                       malformed)


def parquet_file(path: Path) -> pq.ParquetFile:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as err:  # a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({first_line(err)})") from None


def _batches(parquet: pq.ParquetFile, chunk_rows: int, row_groups: Sequence[int] | None) -> Iterator[Any]:
    """Record batches of the whole file, or of some of its row groups (a share read on a worker)."""
    if row_groups is None:
        return parquet.iter_batches(batch_size=chunk_rows)
    return parquet.iter_batches(batch_size=chunk_rows, row_groups=list(row_groups))


def _geoparquet_chunks(path: Path, crs: str | None, chunk_rows: int, row_groups: Sequence[int] | None = None,
                       first_row: int = 0) -> Iterator[tuple[gpd.GeoDataFrame, int]]:
    """Chunks of a GeoParquet file as GeoDataFrames in EPSG:4326, with the feature number of their first row
    (``row_groups``: only these, whose first row is row ``first_row`` of the file, counted from 0)."""
    import geopandas as gpd

    parquet = parquet_file(path)
    try:
        meta = json.loads(parquet.schema_arrow.metadata[b"geo"])
        column = meta["primary_column"]
        column_meta = meta["columns"][column]
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}: GeoParquet metadata names no geometry column") from None
    if column not in parquet.schema_arrow.names:
        raise DataError(f"{path}: holds no geometry (its metadata names column {column!r}, which is not there)")
    if column_meta.get("encoding", "WKB") != "WKB":
        raise DataError(f"{path}: geometry encoding {column_meta['encoding']!r} is read in memory only "
                        "(use --engine memory)")
    declared = column_meta.get("crs", "OGC:CRS84")  # the GeoParquet spec's default, as geopandas reads it
    offset = first_row
    for batch in _batches(parquet, chunk_rows, row_groups):
        table = batch.to_pandas()
        geoms = gpd.GeoSeries.from_wkb(table.pop(column).to_numpy(), crs=declared)
        frame = gpd.GeoDataFrame(table, geometry=geoms.to_numpy(), crs=declared)
        yield vector_in_degrees(frame, path, crs), offset + 1
        offset += len(table)


def table_chunks(path: Path, chunk_rows: int, row_groups: Sequence[int] | None = None,
                 first_row: int = 0) -> Iterator[RawTable]:
    """Rows of a CSV or Parquet table, ``chunk_rows`` at a time, as :func:`urbanprofile.data.io.read_raw_table`
    gives them for the whole file (CSV cells as text, malformed rows left out and counted, file line numbers).

    ``row_groups`` reads only these row groups of a Parquet file, whose first row is row ``first_row`` of the file
    (counted from 0), so that each worker of a distributed build reads its own share."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        delimiter = "\t" if suffix == ".tsv" else ","
        yield from (_quoted_csv_chunks if _csv_has_quotes(path) else _unquoted_csv_chunks)(path, delimiter, chunk_rows)
        return
    if suffix != ".parquet":
        raise DataError(f"{path}: unsupported table format {suffix!r} (use .csv or .parquet)")
    offset = first_row
    for batch in _batches(parquet_file(path), chunk_rows, row_groups):
        frame = batch.to_pandas()
        yield RawTable(path, frame, offset + 1 + np.arange(len(frame)))
        offset += len(frame)


def table_columns(path: Path) -> list[str]:
    if path.suffix.lower() == ".parquet":
        return list(parquet_file(path).schema_arrow.names)
    try:
        return [str(c) for c in pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str,
                                            nrows=0).columns]
    except Exception as err:  # decoding and parsing raise many types for a corrupt file
        raise DataError(f"{path}: cannot read table ({first_line(err)})") from None


def point_chunks(
    path: Path, crs: str | None = None, lon_column: str = "lon", lat_column: str = "lat", chunk_rows: int = 1_000_000,
    row_groups: Sequence[int] | None = None, first_row: int = 0,
) -> Iterator[PointTable]:
    """Points of a CSV, Parquet or GeoParquet file, ``chunk_rows`` rows at a time.

    Each chunk is what :func:`urbanprofile.data.build.points.read_points` gives for those rows of the file (line,
    row or feature numbers are the file's), so the chunks together are the whole file read at once. ``row_groups``
    and ``first_row``: only these row groups of a Parquet file (see :func:`table_chunks`).

    Raises:
        DataError: The file cannot be streamed or read, or a chunk is invalid (named as the whole read names it).
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if not can_stream(path):
        raise DataError(f"{path}: only CSV, Parquet and GeoParquet point files are streamed")
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES or not has_geo_metadata(path):
        for raw in table_chunks(path, chunk_rows, row_groups, first_row):
            yield points_from_table(raw, crs, lon_column, lat_column)
    else:
        for frame, first in _geoparquet_chunks(path, crs, chunk_rows, row_groups, first_row):
            yield points_from_vector(frame, path, first)


# -- counting in chunks -------------------------------------------------------------------------------------------
@dataclass
class PoiChunk:
    """What one chunk of a POI file adds to the counts, made where the chunk was read (here, or on a worker of a
    distributed build that reads its own share of the file); chunks added in file order give the whole file's view.

    Attributes:
        n_rows, n_missing, n_malformed, n_unreadable, example: The chunk's :class:`PointTable` figures.
        n: Points with a location.
        inside: Those in a region.
        low, high: The lon, lat extent of the located points (``inf``, ``-inf`` when none).
        values: Raw category values (``None``: missing) in order of first appearance in the chunk.
        totals: Points per raw value, inside a region or not.
        pairs: Points per ``region position << 32 | value number`` (the chunk's value numbers), inside only.
    """

    n_rows: int
    n_missing: int
    n_malformed: int
    n_unreadable: int
    example: str
    n: int
    inside: int
    low: np.ndarray
    high: np.ndarray
    values: list[object]
    totals: np.ndarray
    pairs: pd.Series


def poi_chunk(chunk: PointTable, column: str, position: np.ndarray) -> PoiChunk:
    """Summarise one chunk of POIs whose region positions (-1 outside) are known.

    Raises:
        DataError: The chunk has no column ``column``.
    """
    frame = chunk.frame
    if column not in frame.columns:
        raise DataError(f"{chunk.path}: no column {column!r} for POI categories "
                        f"(columns: {listed(c for c in frame.columns if c not in ('lon', 'lat'))})")
    codes, uniques = pd.factorize(frame[column].astype("string"), use_na_sentinel=False)  # first appearance order
    lon, lat = frame["lon"].to_numpy(float), frame["lat"].to_numpy(float)
    inside = position >= 0
    # One int64 key per (position, value number): sorting integers is much faster than grouping pairs.
    keys, n = np.unique((position[inside] << 32) | codes[inside].astype(np.int64), return_counts=True)
    low, high = np.full(2, np.inf), np.full(2, -np.inf)
    if len(lon):
        low, high = np.array([np.nanmin(lon), np.nanmin(lat)]), np.array([np.nanmax(lon), np.nanmax(lat)])
    return PoiChunk(chunk.n_rows, chunk.n_missing, chunk.n_malformed, chunk.n_unreadable, chunk.example, len(lon),
                    int(inside.sum()), low, high, [None if pd.isna(v) else str(v) for v in uniques],
                    np.bincount(codes, minlength=len(uniques)), pd.Series(n, index=keys))


class _CategoryCounts:
    """Counts per (region position, raw category value), kept sparse, with raw values in order of first appearance."""

    def __init__(self) -> None:
        self.values: dict[object, int] = {}  # raw value (None for missing) -> id, in order of first appearance
        self.totals = np.zeros(0, dtype=np.int64)  # points per raw value id, inside a region or not
        self.pairs: list[pd.Series] = []
        self.n_points = self.n_inside = 0  # POIs with a location, and those inside a region (set by the reader)

    def add(self, chunk: PoiChunk) -> None:
        """Count one chunk (chunks are added in file order, so raw values keep their order of first appearance)."""
        lookup = np.array([self.values.setdefault(v, len(self.values)) for v in chunk.values], dtype=np.int64)
        self.totals = np.pad(self.totals, (0, len(self.values) - len(self.totals)))
        np.add.at(self.totals, lookup, chunk.totals)
        if len(chunk.pairs):
            keys = chunk.pairs.index.to_numpy()
            self.keep((keys >> 32 << 32) | lookup[keys & 0xFFFFFFFF], chunk.pairs.to_numpy())

    def keep(self, keys: np.ndarray, n: np.ndarray) -> None:
        """Count one chunk's distinct ``position << 32 | raw value id`` keys, ``n`` points each (kept in memory
        here; a partitioned build spills them to disk by block of regions)."""
        self.pairs.append(pd.Series(n, index=keys))
        if len(self.pairs) > 8:  # merge, so that memory follows the distinct pairs, not the chunks read
            self.pairs = [pd.concat(self.pairs).groupby(level=0).sum()]

    def counts(self, n_regions: int, categories: list[str] | dict[str, list[str]] | None,
               regions: pd.Index) -> tuple[pd.DataFrame, dict[str, int], list[str]]:
        """The view, the unknown raw values with counts (most frequent first) and the category names."""
        codes, names, unknown = self.categories(categories)
        out = np.zeros((n_regions, len(names)), dtype=np.int64)
        keys, n = self.merged()
        np.add.at(out, (keys >> 32, codes[keys & 0xFFFFFFFF]), n)
        return frame_from_array(out, regions, names), unknown, names

    def categories(self, categories: list[str] | dict[str, list[str]] | None
                   ) -> tuple[np.ndarray, list[str], dict[str, int]]:
        """The category code of each raw value id, the category names, and the unknown raw values with counts."""
        raw = pd.Series([pd.NA if v is None else v for v in self.values], dtype="string")
        return map_categories(raw, categories, self.totals)

    def merged(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct ``position << 32 | raw value id`` keys, sorted, and their counts."""
        if not self.pairs:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        pairs = pd.concat(self.pairs).groupby(level=0).sum()
        self.pairs = [pairs]
        return pairs.index.to_numpy(), pairs.to_numpy()


def stream_poi_counts(
    path: Path, regions: gpd.GeoDataFrame, spec: BuildSpec, categories: list[str] | dict[str, list[str]] | None,
    report: BuildReport, h3_resolution: int | None = None,
    assign: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    shares: Callable[[bool], Iterator[PoiChunk]] | None = None,
) -> pd.DataFrame:
    """The ``poi_counts`` view of a point file read in chunks; fills the POI figures of ``report``.

    Gives what :func:`urbanprofile.data.build.aggregate.poi_counts` gives for the whole file read at once, with
    memory bounded by ``spec.chunk_rows`` and the counts that are not zero.

    Args:
        path: A CSV, Parquet or GeoParquet point file.
        regions: Polygons in EPSG:4326.
        spec: The columns, CRS, join engine and chunk size.
        categories: As for :func:`urbanprofile.data.build.aggregate.map_categories`.
        report: Where the figures go.
        h3_resolution: The resolution when the regions are H3 cells (their cells are found without a polygon join).
        assign: Region positions (-1 outside) of a chunk's points (lon, lat arrays); default: a
            :class:`~urbanprofile.data.build.join.RegionJoiner` in this process (a distributed build joins the
            chunks on its cluster).
        shares: The chunks' summaries in file order, made elsewhere (a distributed build whose workers read their
            own shares of a Parquet file); called with ``True``, the summaries of the points with longitude and
            latitude swapped (only ``inside`` is read). Default: the file read here, chunk by chunk.

    Raises:
        DataError: The file cannot be read, has no category column, no POI lies inside a region, or the coordinates
            look swapped.
    """
    counts = count_poi_chunks(path, regions, spec, report, assign, h3_resolution=h3_resolution, shares=shares)
    view, unknown, names = counts.counts(len(regions), categories, regions.index)
    record_poi_figures(report, counts.n_points, counts.n_inside, unknown, names)
    return view


def count_poi_chunks(
    path: Path, regions: gpd.GeoDataFrame | gpd.GeoSeries, spec: BuildSpec, report: BuildReport,
    assign: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None, counts: _CategoryCounts | None = None,
    h3_resolution: int | None = None, shares: Callable[[bool], Iterator[PoiChunk]] | None = None,
) -> _CategoryCounts:
    """The POIs of a point file read in chunks, counted per (region position, raw category) as ``assign`` places
    them, with the file's figures added to ``report`` (:func:`stream_poi_counts` makes the view from them).

    Args:
        path, spec, report, assign, h3_resolution, shares: As for :func:`stream_poi_counts`.
        regions: The regions, or anything with their extent (``total_bounds``), for the message of a file whose
            points miss them (and for the default ``assign``).
        counts: Where the counts go (default: in memory).

    Raises:
        DataError: As :func:`stream_poi_counts`.
    """
    column = spec.category_column or "category"
    where = str(path)
    counts = counts if counts is not None else _CategoryCounts()
    n = inside = n_rows = 0
    low, high = np.full(2, np.inf), np.full(2, -np.inf)  # lon, lat extent of the located points

    joiners: list[Callable[[np.ndarray, np.ndarray], np.ndarray]] = [assign] if assign is not None else []

    def read_here(swap: bool) -> Iterator[PoiChunk]:
        if not joiners:  # one index for both passes, built only when the file is read here
            joiners.append(RegionJoiner(regions, spec.engine, h3_resolution).assign)
        joined = joiners[0]
        for chunk in point_chunks(path, spec.crs, spec.lon_column, spec.lat_column, spec.chunk_rows):
            lon, lat = chunk.frame["lon"].to_numpy(float), chunk.frame["lat"].to_numpy(float)
            yield poi_chunk(chunk, column, joined(lat, lon) if swap else joined(lon, lat))

    summaries = shares or read_here
    geo = path.suffix.lower() == ".parquet" and has_geo_metadata(path)
    for chunk in summaries(False):
        if chunk.example and not report.unreadable_example:
            report.unreadable_example = chunk.example
        report.n_pois_missing_location += chunk.n_missing
        report.n_pois_malformed += chunk.n_malformed
        report.n_pois_unreadable += chunk.n_unreadable
        n_rows += chunk.n_rows
        counts.add(chunk)
        n += chunk.n
        inside += chunk.inside
        low, high = np.minimum(low, chunk.low), np.maximum(high, chunk.high)

    def swapped() -> int:
        if max(abs(low[1]), abs(high[1])) > 180:
            return 0
        return sum(c.inside for c in summaries(True))  # a second pass, only when most points missed

    swap_hint = (" (the file's axis order is lat, lon)" if geo
                 else f" (pass --lon-column {spec.lat_column} --lat-column {spec.lon_column})")
    refuse_points_outside(n, inside, swapped, lambda: span(np.array([low[0], high[0]]), np.array([low[1], high[1]])),
                          regions, where, "POIs", swap_hint)
    report.n_pois_read = n_rows - n  # the rows without a usable location; the joined ones are added by the caller
    counts.n_points, counts.n_inside = n, inside
    return counts


def stream_od_from_trips(
    path: Path, regions: gpd.GeoDataFrame, spec: BuildSpec, report: BuildReport, h3_resolution: int | None = None,
    assign: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> tuple[Any, pd.DataFrame | None]:
    """The OD matrix and time-pattern rows of a CSV or Parquet trip table read in chunks of ``spec.chunk_rows``.

    Gives what :func:`urbanprofile.data.build.trips.od_from_trips` gives for the whole table read at once (exactly
    for whole-number trip counts; fractional counts are summed chunk by chunk), keeping only the pairs that are not
    zero. ``assign`` joins trip ends as for :func:`stream_poi_counts`.

    Raises:
        DataError: As :func:`~urbanprofile.data.build.trips.od_from_trips`.
    """
    assign = assign or RegionJoiner(regions, spec.engine, h3_resolution).assign
    counts = TripCounts(regions, spec, report, str(path), table_columns(path), assign)
    for raw in table_chunks(path, spec.chunk_rows):
        counts.add(raw)
    return counts.finish(lambda: table_chunks(path, spec.chunk_rows))
