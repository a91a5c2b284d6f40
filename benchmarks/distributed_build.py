"""Wall time of the distributed build (Dask, local cluster) against the single-machine build, on one seeded input.

H3 resolution-9 cells over a bounding box around New York's latitude, clustered POIs, a grid of land-use parcels
and trips with departure times (seeded, written to a temporary folder). The single-machine build runs in this
process; the distributed builds run on one local cluster of ``--workers`` processes (one thread each), once per
``--parts``. Every distributed folder is checked to be the single-machine one file for file (the manifest but its
timings). Overhead per partition: the slope of the wall time against the number of partitions.

The POIs and trips are written as Parquet in row groups of 100,000 (``--input-format parquet``, default), which the
workers read themselves (POIs share by share, trips chunk by chunk), or as CSV (``--input-format csv``), read on the
client in chunks whose points are joined on the workers.

Run:  python benchmarks/distributed_build.py [--workers 2 --parts 4,16,64 --pois 1500000 --trips 300000]
Writes benchmarks/results/distributed_build.{json,md}.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from common import RESULTS, md_table, parser, run, write_results

from urbanprofile.data.build import BuildSpec, build_dataset
from urbanprofile.data.build.distributed import ClusterSpec, DaskJoiner, dask_client

SEED = 0
BBOX = (-74.30, 40.50, -73.60, 41.00)  # about 31,000 H3 resolution-9 cells
CATEGORIES = ("food", "shop", "school", "health", "office", "leisure")
LANDUSE = ("residential", "commercial", "industrial", "park", "water")
PARCELS = 40  # a 40 x 40 grid of parcels
ROW_GROUP = 100_000  # rows per row group of the POI Parquet file: the unit of the workers' shares


def synthetic_inputs(folder: Path, n_pois: int, n_trips: int, seed: int,
                     input_format: str = "parquet") -> tuple[Path, Path]:
    """Clustered POIs and trips around 25 centres, a grid of land-use parcels, seeded; returns the POI and trip
    files."""
    import geopandas as gpd
    from shapely.geometry import box

    rng = np.random.default_rng(seed)
    west, south, east, north = BBOX
    centres = np.column_stack([rng.uniform(west, east, 25), rng.uniform(south, north, 25)])
    spread = 0.04 * np.array([east - west, north - south])

    def around(n: int) -> np.ndarray:
        xy = centres[rng.integers(0, len(centres), n)] + rng.normal(size=(n, 2)) * spread
        return np.clip(xy, [west, south], [east, north])

    poi = around(n_pois)
    pois = pd.DataFrame({"lon": poi[:, 0], "lat": poi[:, 1], "category": rng.choice(CATEGORIES, n_pois)})
    pois_path = folder / f"pois.{input_format}"
    if input_format == "parquet":
        pois.to_parquet(pois_path, index=False, row_group_size=ROW_GROUP)
    else:
        pois.to_csv(pois_path, index=False)
    origin, dest = around(n_trips), around(n_trips)
    trips = pd.DataFrame({"o_lon": origin[:, 0], "o_lat": origin[:, 1], "d_lon": dest[:, 0], "d_lat": dest[:, 1],
                          "time": rng.uniform(0, 24, n_trips).round(3) % 24})
    trips_path = folder / f"trips.{input_format}"
    if input_format == "parquet":
        trips.to_parquet(trips_path, index=False, row_group_size=ROW_GROUP)
    else:
        trips.to_csv(trips_path, index=False)
    dx, dy = (east - west) / PARCELS, (north - south) / PARCELS
    parcels = [box(west + i * dx, south + j * dy, west + (i + 1) * dx, south + (j + 1) * dy)
               for i in range(PARCELS) for j in range(PARCELS)]
    gpd.GeoDataFrame({"class": rng.choice(LANDUSE, len(parcels))}, geometry=parcels,
                     crs="EPSG:4326").to_file(folder / "landuse.gpkg")
    return pois_path, trips_path


def _digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file, the manifest without its timings (the only thing allowed to differ)."""
    out = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        if path.name == "manifest.json":
            manifest = json.loads(data)
            manifest.pop("created")
            manifest["report"].pop("seconds")
            manifest["report"].pop("output")
            data = json.dumps(manifest, sort_keys=True).encode()
        out[path.name] = hashlib.sha256(data).hexdigest()
    return out


def measure(n_pois: int, n_trips: int, workers: int, parts: list[int],
            input_format: str = "parquet") -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="distributed-build-") as tmp:
        work = Path(tmp)
        pois, trips = synthetic_inputs(work, n_pois, n_trips, SEED, input_format)
        spec = BuildSpec(city="synthetic", boundary=",".join(map(str, BBOX)), h3_resolution=9,
                         pois=pois, landuse=work / "landuse.gpkg", trips=trips)
        expected: dict[str, str] = {}

        def single(run: str) -> None:
            out = work / run.replace(" ", "-")
            start = time.perf_counter()
            report = build_dataset(spec, out)
            wall = time.perf_counter() - start
            expected.update(expected or _digest(out))
            rows.append({"run": run, "workers": 0, "parts": 0, "wall_s": round(wall, 2), "regions": report.n_regions,
                         "steps_s": {k: report.seconds[k] for k in ("pois", "landuse", "trips") if k in report.seconds},
                         "read": report.read_engines, "same_dataset": _digest(out) == expected})
            print(json.dumps(rows[-1]), flush=True)

        single("single machine")
        start = time.perf_counter()
        with dask_client(ClusterSpec(workers=workers)) as client:
            client.wait_for_workers(workers)
            cluster_s = time.perf_counter() - start
            for n in parts:
                out = work / f"parts{n}"
                lines: list[str] = []
                joiner = DaskJoiner(client, n, spec.h3_resolution, lines.append)
                start = time.perf_counter()
                report = build_dataset(spec, out, joiner=joiner)
                wall = time.perf_counter() - start
                figures = joiner.figures
                rows.append({"run": f"{workers} workers", "workers": workers, "parts": n, "wall_s": round(wall, 2),
                             "steps_s": {k: report.seconds[k] for k in ("pois", "landuse", "trips")
                                         if k in report.seconds},
                             "partitions": lines[0].split(" in ", 1)[-1] if lines else "",
                             "tasks": figures.tasks, "points_routed": figures.points_routed,
                             "shares_read_on_workers": figures.shares_read_on_workers,
                             "parcels_sent": figures.parcels_sent, "parcels": figures.parcels,
                             "read": report.read_engines, "same_dataset": _digest(out) == expected})
                print(json.dumps(rows[-1]), flush=True)
        # Once more after the cluster has gone: the load of the shared machine drifts during the runs.
        single("single machine, again")
        n_cells = rows[0]["regions"]
    spread = [r for r in rows if r["parts"]]
    overhead = None
    if len(spread) > 1:  # least-squares slope of wall time against the number of partitions
        overhead = round(float(np.polyfit([r["parts"] for r in spread], [r["wall_s"] for r in spread], 1)[0]), 4)
    return {"seed": SEED, "cells": n_cells, "pois": n_pois, "input_format": input_format, "trips": n_trips,
            "parcels": PARCELS ** 2,
            "cluster_start_s": round(cluster_s, 2), "overhead_s_per_partition": overhead, "rows": rows,
            "load_average": os.getloadavg()[0]}


def markdown(result: dict[str, Any]) -> str:
    files = result.get("input_format", "csv") + (f", row groups of {ROW_GROUP:,}"
                                                  if result.get("input_format") == "parquet" else "")
    head = (f"# Distributed build (Dask) against the single-machine build\n\n"
            f"`python benchmarks/distributed_build.py` (seed {result['seed']}): {result['cells']:,} H3 "
            f"resolution-9 cells, {result['pois']:,} clustered POIs, {result['parcels']:,} land-use parcels, "
            f"{result['trips']:,} trips with departure times (POIs and trips as {files}). One local cluster "
            f"(processes, 1 thread each; "
            f"started in {result['cluster_start_s']} s, not counted below) runs every distributed build. "
            f"'same dataset': every file of the folder equals the single-machine one (the manifest but its "
            f"timings). Load average when it ended: {result['load_average']:.1f} on 2 shared cores.\n\n")
    table = md_table(
        ["run", "parts", "read", "wall s", "POIs s", "land use s", "trips s", "tasks", "shares read on workers",
         "parcel copies", "same dataset", "partitions"],
        [[r["run"], r["parts"] or "-", ", ".join(f"{k} {v}" for k, v in r.get("read", {}).items()) or "-",
          r["wall_s"], r["steps_s"].get("pois", "-"), r["steps_s"].get("landuse", "-"),
          r["steps_s"].get("trips", "-"), r.get("tasks", "-"), r.get("shares_read_on_workers", "-"),
          f"{r['parcels_sent'] / r['parcels']:.2f}" if r.get("parcels") else "-",
          "yes" if r["same_dataset"] else "NO", r.get("partitions", "")]
         for r in result["rows"]])
    tail = (f"\nOverhead per partition (least-squares slope of the wall time against the partitions): "
            f"{result['overhead_s_per_partition']} s.\n")
    return head + table + tail


def main() -> int:
    args_parser = parser(__doc__, out=RESULTS, parts="4,16,64", parts_help="partition counts of the distributed runs")
    args_parser.add_argument("--workers", type=int, default=2, help="local worker processes (default 2)")
    args_parser.add_argument("--pois", type=int, default=1_500_000, help="POIs (default 1500000)")
    args_parser.add_argument("--trips", type=int, default=300_000, help="trips (default 300000)")
    args_parser.add_argument("--input-format", choices=("parquet", "csv"), default="parquet",
                             help="POI and trip files: parquet (read by the workers; default) or csv (by the client)")
    args = args_parser.parse_args()
    parts = [int(p) for p in args.parts.split(",") if p]
    result = measure(args.pois, args.trips, args.workers, parts, args.input_format)
    write_results(args.out, "distributed_build", result, markdown(result))
    return 0 if all(r["same_dataset"] for r in result["rows"]) else 1


if __name__ == "__main__":
    run(main)
