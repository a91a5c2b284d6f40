"""Commands on datasets: list and describe them, build one from raw geodata, attach indicators to one."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from urbanprofile.clikit import ConfigFile, DataDir, check_output, configured, err, fmt, opt, out, split_list
from urbanprofile.errors import UrbanProfileError

# The project's data, evaluation, benchmark and report modules are imported inside each command, not here: they
# pull pandas and scikit-learn (about 2 s measured with `python -X importtime` on this busy 2-core machine, where
# `urbanprofile --help` takes 0.3 s), which --help, --version and a mistyped option must not pay.


# -- datasets ----------------------------------------------------------------------------------------
def datasets_list(data_dir: DataDir = None) -> None:
    """List the datasets discovered in the data directory (reads no arrays)."""
    from urbanprofile.data.registry import discover
    from urbanprofile.report.terminal import Column, FitTable

    entries = discover(data_dir)
    table = FitTable([Column("dataset"), Column("family", priority=2), Column("path", "text", priority=1),
                      Column("status", "text")])
    for name, entry in entries.items():
        status = "ok" if entry.complete else f"incomplete: missing {', '.join(entry.missing)}"
        table.add_row(name, entry.family, str(entry.path), status)
    out.print(table)


def datasets_info(
    name: Annotated[str, typer.Argument(help="Dataset name, e.g. hafusion-nyc.")],
    data_dir: DataDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Regions, views, tasks and label statistics of one dataset."""
    from urbanprofile.data.registry import load_dataset
    from urbanprofile.data.tasks import task_data
    from urbanprofile.report.terminal import Column, FitTable

    city = load_dataset(name, data_dir)
    summary = city.summary()
    summary["task_rows"] = {t: task_data(city, t).describe() for t in city.tasks}
    if as_json:
        out.print_json(json.dumps(summary, default=str))
        return
    out.print(Text.assemble((city.name, "bold"), f": {city.meta.get('description', '')}"))
    out.print(f"source: {city.meta.get('source')}")
    out.print(f"locations: {city.meta.get('location_source')}")
    views = FitTable([Column("view"), Column("shape", "figure")])
    for view, shape in summary["views"].items():
        views.add_row(view, " x ".join(map(str, shape)))
    if views.rows:
        out.print(views)
    else:  # an empty table reads as a display fault
        out.print("views: none (methods built on views, such as raw-poi, do not apply)")
    if summary["modalities"]:  # image and text datasets have no numeric views, only these
        modalities = FitTable([Column("modality"), Column("items", "figure", justify="right"),
                               Column("regions with one", "figure", justify="right")])
        for modality, counts in summary["modalities"].items():
            modalities.add_row(modality, str(counts["items"]), str(counts["regions"]))
        out.print(modalities)
    labels = FitTable([Column("task"), *(Column(h, "figure", priority=p, justify="right") for h, p in (
        ("n", 0), ("missing", 2), ("zeros", 3), ("mean", 1), ("std", 1), ("min", 2), ("max", 2))),
        Column("used for evaluation", "text", priority=1)])
    for task, stats in summary["tasks"].items():
        labels.add_row(task, *(fmt(stats[k], 1) for k in ("n", "missing", "zeros", "mean", "std", "min", "max")),
                       summary["task_rows"][task])
    out.print(labels)
    for note in city.meta.get("notes", []):
        out.print(f"note: {note}")


# -- build and map -----------------------------------------------------------------------------------
def build(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Dataset folder to create (e.g. DATA/built/<city>).")],
    city: Annotated[str | None, typer.Argument(help="Short lowercase city name; the dataset is built-<city> "
                                               "(or city in --config).", show_default=False)] = None,
    regions: Annotated[Path | None, typer.Option(help="Region polygons (GeoParquet, GeoJSON, GPKG, shapefile).",
                                                 show_default=False)] = None,
    region_id_column: Annotated[str | None, opt("Field holding region ids (default region_id, else 0..N-1).")] = None,
    region_name_column: Annotated[str | None, opt("Field holding region names (shown on maps).")] = None,
    boundary: Annotated[str | None, opt("Boundary to cut into H3 cells: vector file, .osm.pbf, or W,S,E,N.")] = None,
    h3_res: Annotated[int | None, typer.Option("--h3-res", help="H3 resolution (0-15).", show_default=False)] = None,
    h3_centres_only: Annotated[bool | None, typer.Option(
        "--h3-centres-only", help="Keep only H3 cells whose centre is inside the boundary.", show_default=False)
                               ] = None,
    pois: Annotated[Path | None, opt("POI points (vector file, CSV/Parquet with lon/lat, or .osm.pbf).")] = None,
    category_column: Annotated[str | None, opt("POI category field (default: category).")] = None,
    categories: Annotated[str | None, opt("Comma-separated categories, or a JSON list/mapping file.")] = None,
    lon_column: Annotated[str | None, opt("Longitude column of CSV/Parquet tables (default: lon).")] = None,
    lat_column: Annotated[str | None, opt("Latitude column of CSV/Parquet tables (default: lat).")] = None,
    landuse: Annotated[Path | None, opt("Land-use polygons with a class field (or .osm.pbf).")] = None,
    landuse_class_column: Annotated[str | None, opt("Land-use class field (default: class).")] = None,
    trips: Annotated[Path | None, opt(
        "Trips (CSV/Parquet): origin,destination ids, or both ends' coordinates (o_lon..., pickup_/dropoff_ "
        "longitude/latitude, start_/end_ lat/lng, origin_/destination_ ...).")] = None,
    trip_columns: Annotated[str | None, opt("2 id columns or 4 coordinate columns, comma-separated.")] = None,
    trip_time_column: Annotated[str | None, opt("Departure time column (default: time, when present).")] = None,
    trip_weight: Annotated[str | None, typer.Option("--trip-weight", help=(
        "Column with the number of trips per row (default: one named trips, count, n, weight or flow; "
        "'none' or no such column: each row is one trip)."), show_default=False)] = None,
    time_patterns: Annotated[int | None, opt("Time-of-day patterns the trips are split into (default: 4).")
                             ] = None,
    labels: Annotated[Path | None, opt("Labels: CSV/Parquet keyed by region id, or points with values.")] = None,
    label_id_column: Annotated[str | None, opt("Region-id column of the labels table (default: region_id).")
                               ] = None,
    label_columns: Annotated[str | None, opt("Comma-separated label columns (of --labels, else of --regions).")
                             ] = None,
    label_agg: Annotated[str | None, opt("Aggregation of point labels per region (default: mean).")] = None,
    crs: Annotated[str | None, opt("CRS of inputs that declare none (and of CSV coordinates), e.g. EPSG:31983.")
                   ] = None,
    join_engine: Annotated[str | None, opt("Spatial join: auto (default), geopandas or duckdb.")] = None,
    max_cells: Annotated[int | None, typer.Option(
        "--max-cells", help="Most H3 cells --boundary may be cut into (default: 200000).", show_default=False)
                         ] = None,
    engine: Annotated[str | None, opt(
        "How POI and trip files are read: auto (default; streams large ones), memory, streaming (in chunks) or "
        "partitioned (large H3 builds, no polygon per cell held).")
                      ] = None,
    chunk_rows: Annotated[int | None, opt("Rows per chunk of a streamed read (default: 1000000).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=(
        "Replace an existing dataset folder (only one a build wrote, holding nothing else)."))] = False,
    parents: Annotated[bool, typer.Option("--parents", help="Create the output's missing parent folders.")] = False,
    config: ConfigFile = None,
    workers: Annotated[int | None, opt("Join on a local Dask cluster of N worker processes (same dataset).")] = None,
    scheduler: Annotated[str | None, opt("Join on the Dask cluster of this scheduler (tcp://host:8786).")] = None,
    parts: Annotated[int | None, opt("Partitions of a --workers/--scheduler build (default: 16).")] = None,
) -> None:
    """Build a dataset folder from raw geodata files (regions or H3 cells, POIs, land use, trips, labels).

    A --config file's keys are the fields of BuildSpec (city, regions, h3_resolution, pois, ...).
    """
    import shlex

    from urbanprofile.data.build.pipeline import build_dataset
    from urbanprofile.data.build.spec import BuildSpec
    from urbanprofile.report.terminal import Column, FitTable

    spec = configured(BuildSpec, config, dict(
        city=city, regions=regions, region_id_column=region_id_column, region_name_column=region_name_column,
        boundary=boundary, h3_resolution=h3_res, h3_cover=None if h3_centres_only is None else not h3_centres_only,
        pois=pois, category_column=category_column,
        categories=categories if categories is None or categories.endswith(".json") else split_list(categories),
        lon_column=lon_column, lat_column=lat_column, landuse=landuse, landuse_class_column=landuse_class_column,
        trips=trips, trip_columns=split_list(trip_columns), trip_time_column=trip_time_column,
        trip_weight_column=trip_weight,
        n_time_patterns=time_patterns, labels=labels, label_id_column=label_id_column,
        label_columns=split_list(label_columns), label_agg=label_agg, crs=crs, join_engine=join_engine,
        max_cells=max_cells, build_engine=engine, chunk_rows=chunk_rows,
    ), flag_names={"city": "CITY", "h3_resolution": "--h3-res", "n_time_patterns": "--time-patterns",
                   "trip_weight_column": "--trip-weight", "build_engine": "--engine"})
    city = spec.city
    if not out_dir.exists():  # an existing folder is judged by the build (--overwrite, only a built dataset)
        check_output(out_dir, parents=parents, folder=True)
    command = "urbanprofile " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    from urbanprofile.data.build.distributed import build_dataset_distributed, cluster_options

    cluster = cluster_options(workers, scheduler, parts)  # None: the joins run in this process
    if cluster is None:
        report = build_dataset(spec, out_dir, overwrite=overwrite, progress=True, command=command, log=err.print)
    else:
        report = build_dataset_distributed(spec, out_dir, cluster, overwrite=overwrite, progress=True,
                                           command=command, log=err.print)
    for line in report.warnings():
        err.print(f"warning: {line}")
    table = FitTable([Column("figure"), Column("value", "text")],
                     title=f"built-{city}: {report.region_kind} regions, {report.join_engine} join")
    rows = [
        ("regions", report.n_regions),
        ("POIs joined / read", f"{report.n_pois_joined} / {report.n_pois_read}" if spec.pois else "-"),
        ("POI categories", report.n_categories or "-"),
        ("land-use classes", report.n_landuse_classes or "-"),
        ("trips kept / read", f"{report.n_trips_kept} / {report.n_trips_read}" if spec.trips else "-"),
        *([(f"trips kept / read (by {report.trip_weight_column})",
            f"{report.trips_weighted_kept:g} / {report.trips_weighted_read:g}")] if report.trip_weight_column else []),
        ("trip columns", ", ".join(report.trip_columns) or "-"),
        ("read", ", ".join(f"{k} {v}" for k, v in report.read_engines.items()) or "-"),
        ("tasks", ", ".join(report.tasks) or "-"),
        ("seconds", f"{report.seconds['total']:.1f}"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    out.print(table)
    out.print(f"wrote {report.output}")


# -- attach: indicators from their own polygons onto a dataset's regions ----------------------------------
def attach(
    name: Annotated[str, typer.Argument(help="Dataset name (or a built dataset folder).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Indicators folder (written: <out>/<dataset>/<set>.*; "
                                          "point URBANPROFILE_INDICATORS at it to use the tasks).")],
    indicators: Annotated[Path | None, opt("Indicator polygons (GeoPackage, GeoJSON, GeoParquet, shapefile, CSV "
                                            "with WKT geometry) or a table keyed by region id (--key).")] = None,
    extensive: Annotated[str | None, opt("Comma-separated count columns (split over regions).")] = None,
    intensive: Annotated[str | None, opt("Comma-separated rate/median columns (averaged).")] = None,
    weights: Annotated[str | None, opt("Dasymetric weights PATH:COLUMN: points (vector, or CSV with lon/lat) or a "
                                        "GeoTIFF (PATH[:BAND]).")] = None,
    key: Annotated[str | None, opt("Region-id column: the table is already per region (no interpolation).")] = None,
    id_column: Annotated[str | None, opt("Column naming the indicator features in errors.")] = None,
    crs: Annotated[str | None, opt("CRS of an indicator file that declares none, e.g. EPSG:2263.")] = None,
    councilcount: Annotated[int | None, opt("Instead of --indicators: the NYC ACS 5-year set by NTA from the "
                                             "councilcount package (2016 or 2023), dasymetric by tax-lot population."
                                             )] = None,
    set_name: Annotated[str | None, typer.Option("--name", help="Set name (default: the file stem, or acs<year>).",
                                                 show_default=False)] = None,
    prefix: Annotated[str, typer.Option(help="Prefix of the task names (not for --councilcount: acs_...).")] = "",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a set of the same name.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Attach indicators to a dataset's regions by areal interpolation (tobler); they become the dataset's tasks."""
    import os
    import shlex

    import numpy as np

    from urbanprofile.data.indicators import ACS_CAVEAT, nyc_acs_indicators, write_indicator_set
    from urbanprofile.data.interpolate import attach_by_key, interpolate, read_indicator_layer, read_weights
    from urbanprofile.data.registry import load_dataset

    if (indicators is None) == (councilcount is None):
        raise UrbanProfileError("give either --indicators FILE or --councilcount YEAR")
    if key is not None and weights is not None:
        raise UrbanProfileError("--weights has no use with --key (a table keyed by region is not interpolated)")
    city = load_dataset(name, data_dir)
    from urbanprofile.data.registry import resolve_data_dir

    if data_dir is not None or os.environ.get("URBANPROFILE_DATA"):
        root = resolve_data_dir(data_dir).resolve()
        if out_dir.resolve() == root or root in out_dir.resolve().parents:
            raise UrbanProfileError(f"--out {out_dir} is inside the data directory {root}, which is read-only to us")
    info: dict[str, Any] = {"command": "urbanprofile " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    if councilcount is not None:
        with err.status(f"attaching councilcount's ACS {councilcount} estimates to {city.name}"):
            attached, extra = nyc_acs_indicators(city, councilcount)
        info |= extra
        set_name = set_name or f"acs{councilcount}"
    else:
        assert indicators is not None
        ext, inten = split_list(extensive) or [], split_list(intensive) or []
        if key is not None:
            attached = attach_by_key(city.region_ids, read_indicator_layer(indicators, crs, key), key, [*ext, *inten],
                                     str(indicators), city.name)
        else:
            import geopandas as gpd

            layer = read_indicator_layer(indicators, crs)
            assert isinstance(layer, gpd.GeoDataFrame)
            points = read_weights(weights, crs) if weights else None
            attached = interpolate(city.regions, layer, ext, inten, points, source_name=str(indicators),
                                   id_column=id_column)
        if prefix:
            attached.values.columns = [f"{prefix}{c}" for c in attached.values.columns]
        info |= {"source": str(indicators.resolve()), "extensive": ext, "intensive": inten, "weights": weights}
        set_name = set_name or indicators.stem.lower().replace(" ", "_")
    clash = [c for c in attached.values.columns if c in city.tasks]
    if clash:
        raise UrbanProfileError(f"task {clash[0]!r} already exists in {city.name}: use --prefix or other columns")
    path = write_indicator_set(out_dir, city.name, set_name, attached, info, overwrite=overwrite)
    from urbanprofile.report.terminal import Column, FitTable

    table = FitTable([Column("task"), *(Column(h, "figure", priority=p, justify="right") for h, p in (
        ("labelled regions", 0), ("distinct values", 1), ("mean", 0), ("min", 2), ("max", 2)))],
        title=f"{set_name} on {city.name} ({attached.method})")
    for column in attached.values.columns:
        values = attached.values[column]
        table.add_row(column, str(int(values.notna().sum())), str(values.nunique()), fmt(values.mean(), 2),
                      fmt(values.min(), 2), fmt(values.max(), 2))
    out.print(table)
    coverage = attached.coverage.to_numpy()
    out.print(f"coverage: {int((coverage >= 0.999).sum())} regions fully covered, "
              f"{int(((coverage > 0) & (coverage < 0.999)).sum())} partly (median {np.median(coverage):.2f}), "
              f"{int((coverage == 0).sum())} not at all")
    for note in attached.notes:
        out.print(f"note: {note}")
    if councilcount is not None and not any(ACS_CAVEAT in n for n in attached.notes):
        out.print(f"note: {ACS_CAVEAT}")
    err.print(f"wrote {path}; set URBANPROFILE_INDICATORS={out_dir} to use these as tasks of {city.name}")
