"""The whole build: every step in order, timed, and the dataset folder written only when all succeed."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from urbanprofile.data.build.aggregate import landuse_shares, poi_counts, read_landuse
from urbanprofile.data.build.join import RegionJoiner
from urbanprofile.data.build.labels import labels_for_regions
from urbanprofile.data.build.messages import span
from urbanprofile.data.build.osm import OSM_CATEGORIES, is_osm_extract
from urbanprofile.data.build.points import read_points
from urbanprofile.data.build.regions import h3_cell_estimate, h3_regions, read_boundary, regions_from_file
from urbanprofile.data.build.spec import BuildReport, BuildSpec, BuiltCity
from urbanprofile.data.build.steps import UNITS, Steps, load_categories, source_of
from urbanprofile.data.build.streaming import choose_engine, stream_od_from_trips, stream_poi_counts
from urbanprofile.data.build.trips import od_from_trips
from urbanprofile.data.city import CityData, frame_from_array, sparse_square_view
from urbanprofile.data.io import RawTable, read_raw_table
from urbanprofile.data.loaders.built import MAX_DENSE_PATTERN_CELLS, check_output, patterns_view, write_built
from urbanprofile.errors import DataError

if TYPE_CHECKING:
    import geopandas as gpd

class Joiner:
    """Where the POI, land-use and trip joins of a build run: here, in this process. A subclass may run them
    elsewhere (:class:`~urbanprofile.data.build.distributed.DaskJoiner`: partitioned on a Dask cluster) and must
    give the same views and report figures."""

    def poi_counts(self, points: pd.DataFrame, regions: gpd.GeoDataFrame, category_column: str,
                   categories: list[str] | dict[str, list[str]] | None, engine: str, report: BuildReport,
                   where: str, swap_hint: str) -> pd.DataFrame:
        """The ``poi_counts`` view of POIs read in memory (see :func:`~.aggregate.poi_counts`)."""
        return poi_counts(points, regions, category_column, categories, engine, report, where, swap_hint)

    def landuse_shares(self, regions: gpd.GeoDataFrame, landuse: gpd.GeoDataFrame, class_column: str) -> pd.DataFrame:
        """The ``landuse_counts`` view (see :func:`~.aggregate.landuse_shares`)."""
        return landuse_shares(regions, landuse, class_column)

    def od_from_trips(self, trips: RawTable, regions: gpd.GeoDataFrame, spec: BuildSpec, report: BuildReport,
                      where: str) -> tuple[Any, pd.DataFrame | None]:
        """The OD matrix and pattern rows of trips read in memory (see :func:`~.trips.od_from_trips`)."""
        return od_from_trips(trips, regions, spec, report, where)

    def assigner(self, regions: gpd.GeoDataFrame, engine: str,
                 h3_resolution: int | None) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """How a streamed build joins chunk after chunk of points (lon, lat arrays) to region positions."""
        return RegionJoiner(regions, engine, h3_resolution).assign

    def stream_poi_counts(self, path: Path, regions: gpd.GeoDataFrame, spec: BuildSpec,
                          categories: list[str] | dict[str, list[str]] | None, report: BuildReport,
                          h3_resolution: int | None) -> pd.DataFrame:
        """The ``poi_counts`` view of a POI file read in chunks (see :func:`~.streaming.stream_poi_counts`)."""
        return stream_poi_counts(path, regions, spec, categories, report, h3_resolution,
                                 self.assigner(regions, spec.engine, h3_resolution))

    def stream_od_from_trips(self, path: Path, regions: gpd.GeoDataFrame, spec: BuildSpec, report: BuildReport,
                             h3_resolution: int | None) -> tuple[Any, pd.DataFrame | None]:
        """The OD matrix and pattern rows of a trip file read in chunks (:func:`~.streaming.stream_od_from_trips`)."""
        return stream_od_from_trips(path, regions, spec, report, h3_resolution,
                                    self.assigner(regions, spec.engine, h3_resolution))


def build_city(
    spec: BuildSpec, progress: bool = False, log: Callable[[str], None] | None = None, joiner: Joiner | None = None,
    sparse_od_view: bool = True,
) -> BuiltCity:
    """Read every input of ``spec`` and aggregate it per region, in memory (nothing is written).

    Args:
        spec: What to read and how.
        progress: Show a progress bar on stderr.
        log: Where lines for the user go (the H3 size estimate) when there is no progress bar.
        joiner: Where the joins run (default: :class:`Joiner`, in this process). A streamed file is read here in
            chunks and the joiner joins each chunk, except a streamed Parquet POI or trip file on a Dask cluster,
            whose workers read it.
        sparse_od_view: Give a large city's sparse OD matrix as a view; ``False`` keeps it in
            ``BuiltCity.od_matrix`` only (a pandas sparse view holds one column object per region, about 1.5 KB
            and 30 µs each: GBs and minutes for a country, spent only to be written out again).

    Raises:
        DataError: An input is missing, unreadable or inconsistent, or a view would hold nothing (no POI, parcel
            or trip joins a region): the message names the file, field or region.
    """
    spec.check()
    joiner = joiner or Joiner()
    categories = load_categories(spec.categories)
    report = BuildReport(city=spec.city, join_engine=spec.engine)
    n_steps = 1 + sum(x is not None for x in (spec.pois, spec.landuse, spec.trips)) + (
        spec.labels is not None or spec.label_columns is not None)
    steps = Steps(n_steps, progress, report, log)
    start = time.perf_counter()
    sources: dict[str, Any] = {}
    views: dict[str, pd.DataFrame] = {}
    meta: dict[str, Any] = {}
    pattern_rows = None
    od_matrix = None
    try:
        attributes = None
        with steps.step("regions", "reading regions"):
            if spec.regions is not None:
                regions, attributes, report.n_geometries_repaired = regions_from_file(
                    Path(spec.regions), spec.region_id_column, spec.region_name_column, spec.crs)
                report.n_region_overlaps, report.region_overlap_example = regions.attrs.pop("overlaps", (0, ""))
                report.region_kind = "polygon"
                sources["regions"] = source_of(spec.regions)
            else:
                assert spec.boundary is not None and spec.h3_resolution is not None
                boundary = read_boundary(spec.boundary, spec.crs)
                report.h3_cells_estimate = h3_cell_estimate(boundary, spec.h3_resolution, spec.h3_cover)
                steps.log(f"H3 resolution {spec.h3_resolution} over {spec.boundary}: about "
                          f"{report.h3_cells_estimate:,} cells (limit --max-cells {spec.max_cells:,})")
                regions = h3_regions(boundary, spec.h3_resolution, spec.h3_cover, spec.max_cells, str(spec.boundary))
                report.region_kind = "h3"
                meta["h3_resolution"] = spec.h3_resolution
                sources["boundary"] = source_of(spec.boundary)
            report.n_regions = len(regions)
        if spec.pois is not None:
            with steps.step("pois", f"joining POIs to {len(regions)} regions ({spec.engine})"):
                pois_path = Path(spec.pois)
                report.read_engines["pois"] = choose_engine(spec, pois_path)
                if report.read_engines["pois"] == "streaming":
                    h3_resolution = meta.get("h3_resolution")
                    views["poi_counts"] = joiner.stream_poi_counts(pois_path, regions, spec, categories, report,
                                                                   h3_resolution)
                else:
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
                    views["poi_counts"] = joiner.poi_counts(points.frame, regions, column, chosen, spec.engine,
                                                            report, str(pois_path), swap_hint)
                sources["pois"] = source_of(pois_path)
        if spec.landuse is not None:
            with steps.step("landuse", "overlaying land use"):
                landuse = read_landuse(Path(spec.landuse), spec.landuse_class_column, spec.crs, report)
                report.n_landuse_polygons = len(landuse)
                views["landuse_counts"] = joiner.landuse_shares(regions, landuse, spec.landuse_class_column)
                if not views["landuse_counts"].to_numpy().any():
                    bounds = landuse.total_bounds
                    raise DataError(f"{spec.landuse}: no land-use polygon overlaps a region (they span "
                                    f"{span(bounds[[0, 2]], bounds[[1, 3]])}); the view would be all zeros")
                report.n_landuse_classes = views["landuse_counts"].shape[1]
                sources["landuse"] = source_of(spec.landuse)
        if spec.trips is not None:
            with steps.step("trips", "assigning trips to regions"):
                report.read_engines["trips"] = choose_engine(spec, Path(spec.trips))
                if report.read_engines["trips"] == "streaming":
                    h3_resolution = meta.get("h3_resolution")
                    od, pattern_rows = joiner.stream_od_from_trips(Path(spec.trips), regions, spec, report,
                                                                   h3_resolution)
                else:
                    od, pattern_rows = joiner.od_from_trips(read_raw_table(Path(spec.trips)), regions, spec, report,
                                                            str(spec.trips))
                if isinstance(od, np.ndarray):
                    views["od_flows"] = frame_from_array(od, regions.index, regions.index)
                elif sparse_od_view:
                    views["od_flows"] = sparse_square_view(od, regions.index)
                else:
                    od_matrix = od
                # A large city's time patterns go to disk as rows only (a dense view is P x N x N).
                if (pattern_rows is not None and isinstance(od, np.ndarray)
                        and spec.n_time_patterns * len(regions) ** 2 <= MAX_DENSE_PATTERN_CELLS):
                    views["od_patterns"] = patterns_view(pattern_rows, regions.index, spec.n_time_patterns)
                sources["trips"] = source_of(spec.trips)
        targets = pd.DataFrame(index=regions.index)
        if spec.labels is not None or spec.label_columns is not None:
            with steps.step("labels", "matching labels"):
                targets = labels_for_regions(regions, attributes, spec, report)
                report.tasks = list(targets.columns)
                sources["labels"] = source_of(spec.labels) if spec.labels is not None else {"value": "regions file"}
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
        "units": {k: v for k, v in UNITS.items() if k in views or (k == "od_patterns" and pattern_rows is not None)
                  or (k == "od_flows" and od_matrix is not None)},
        "notes": report.warnings(),
    })
    city = CityData(name=f"built-{spec.city}", regions=regions, views=views, targets=targets, meta=meta).validate()
    return BuiltCity(city=city, report=report, sources=sources, od_pattern_rows=pattern_rows, od_matrix=od_matrix)


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
    from urbanprofile.data.build.partitioned import build_partitioned, use_partitioned

    if use_partitioned(spec, joiner):  # large H3 builds: no polygon per cell held (data/build/partitioned.py)
        return build_partitioned(spec, target, overwrite, progress, command, log)
    built = build_city(spec, progress=progress, log=log, joiner=joiner, sparse_od_view=False)
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
                         od_pattern_rows=built.od_pattern_rows if "od_patterns" not in built.city.views else None,
                         od_matrix=built.od_matrix)
    report.seconds["write"] = round(time.perf_counter() - with_write, 3)
    report.seconds["total"] = round(time.perf_counter() - start, 3)
    report.output = str(target)
    return report


