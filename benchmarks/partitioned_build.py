"""The partitioned H3 build against the streamed one on the same synthetic country: time, and the same dataset.

For each size, a seeded country (``benchmarks/synthetic_country.py``, 5 POIs and 0.5 trips per H3 resolution-9
cell) is built in this process by ``--engine streaming`` and ``--engine partitioned`` one after the other (the order
alternates between sizes, so neither always pays the imports), and every file of the two folders is compared as
read (``regions``, ``poi_counts``, ``od_flows``, ``od_patterns``; geometry as WKB) along with the loaded views. Peak
memory is not measured here (one process builds both; ``benchmarks/scale.py --parts build`` measures each build's
own peak). Writes ``partitioned_build.{json,md}``.

Run:  python benchmarks/partitioned_build.py --sizes 5k,100k,1m
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
from common import RESULTS, md_table, parser, run, write_results
from scale import MACHINE, POIS_PER_CELL, RESOLUTION, SEED, TRIPS_PER_CELL, parse_size
from synthetic_country import CountrySpec, bbox_for_cells, generate

from urbanprofile.data.build import BuildSpec, build_dataset
from urbanprofile.data.loaders.built import load_built

FILES = ("regions", "poi_counts", "od_flows", "od_patterns")


def _same(a: Path, b: Path) -> bool:
    for name in FILES:
        left, right = pd.read_parquet(a / f"{name}.parquet"), pd.read_parquet(b / f"{name}.parquet")
        if not left.equals(right):
            return False
    x, y = load_built(a), load_built(b)
    return x.regions.drop(columns="geometry").equals(y.regions.drop(columns="geometry")) and all(
        x.views[v].equals(y.views[v]) for v in x.views)


def measure(cells: int, first: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="partitioned-build-") as tmp:
        work = Path(tmp)
        generate(CountrySpec(bbox=bbox_for_cells(cells, RESOLUTION), n_pois=int(POIS_PER_CELL * cells),
                             n_trips=int(TRIPS_PER_CELL * cells), seed=SEED), work / "in")
        row: dict[str, Any] = {"size": cells, "pois": int(POIS_PER_CELL * cells),
                               "trips": int(TRIPS_PER_CELL * cells), "first": first,
                               "load_avg_1min": round(os.getloadavg()[0], 1)}
        order = [first, "partitioned" if first == "streaming" else "streaming"]
        for engine in order:
            spec = BuildSpec("synthetic", boundary=str(work / "in" / "boundary.geojson"), h3_resolution=RESOLUTION,
                             pois=work / "in" / "pois.parquet", trips=work / "in" / "trips.parquet",
                             max_cells=3 * cells + 10_000, build_engine=engine)
            start = time.perf_counter()
            report = build_dataset(spec, work / engine, command="benchmark")
            row[f"{engine}_s"] = round(time.perf_counter() - start, 1)
            row["cells"] = report.n_regions
        row["same_dataset"] = _same(work / "streaming", work / "partitioned")
        return row


def main() -> None:
    args_parser = parser(__doc__, out=RESULTS)
    args_parser.add_argument("--sizes", default="5k,100k,1m", help="rungs, in H3 cells")
    args = args_parser.parse_args()
    rows = []
    for i, text in enumerate(s for s in args.sizes.split(",") if s.strip()):
        row = measure(parse_size(text), "streaming" if i % 2 == 0 else "partitioned")
        print(row, flush=True)
        rows.append(row)
    write_results(args.out, "partitioned_build", {"environment": {"machine": MACHINE, "seed": SEED}, "rows": rows},
                  markdown(rows))


def markdown(rows: list[dict[str, Any]]) -> str:
    table = [[f"{r['size']:,}", f"{r['cells']:,}", f"{r['pois']:,}", f"{r['trips']:,}", r["first"],
              f"{r['streaming_s']:.1f}", f"{r['partitioned_s']:.1f}", "yes" if r["same_dataset"] else "NO",
              f"{r['load_avg_1min']:.1f}"] for r in rows]
    return "\n".join([
        "# The partitioned build against the streamed build", "",
        "`python benchmarks/partitioned_build.py`: both engines on one seeded synthetic country per row, in one "
        "process, one after the other; the folders compared file by file as read.", "",
        f"Machine: {MACHINE}. Wall times move with the load.", "",
        md_table(["rung (cells)", "cells", "POIs", "trips", "built first", "streaming s", "partitioned s",
                  "same dataset", "load avg"], table), *[f"- {r['note']}" for r in rows if "note" in r], ""])


if __name__ == "__main__":
    run(main)
