"""Peak memory and wall time of ``urbanprofile build`` with trips, on a seeded synthetic city (issue 22).

H3 resolution-9 cells over a bounding box, clustered POIs and trips (with departure times, so the
time-of-day patterns are built too) written to CSV in a temporary folder; each point is one
``python -m urbanprofile.cli build`` subprocess run under ``/usr/bin/time -v`` (peak RSS of the whole build).

Run:  python benchmarks/build_trips_memory.py --parts 10k,100k [--src DIR --label before]
      (``--src`` is the ``src`` folder to import urbanprofile from, e.g. main's to measure before a change)
Writes benchmarks/results/build_trips_memory.{json,md}; runs of other labels/points already there are kept.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from common import RESULTS, parser, run, write_results

SEED = 0
#: name -> (bounding box W,S,E,N around New York's latitude, number of trips); resolution 9 cells are ~0.1 km².
POINTS: dict[str, tuple[tuple[float, float, float, float], int]] = {
    "10k": ((-74.20, 40.60, -73.815, 40.89), 50_000),
    "100k": ((-74.60, 40.30, -73.38, 41.22), 200_000),
}
N_POIS = 50_000
CATEGORIES = ("food", "shop", "school", "health", "office", "leisure")


def synthetic_inputs(folder: Path, bbox: tuple[float, float, float, float], n_trips: int, seed: int) -> None:
    """Clustered POIs and trips (origin and destination drawn around city centres), seeded."""
    rng = np.random.default_rng(seed)
    west, south, east, north = bbox
    centres = np.column_stack([rng.uniform(west, east, 25), rng.uniform(south, north, 25)])
    spread = 0.04 * np.array([east - west, north - south])

    def around(n: int) -> np.ndarray:
        picks = centres[rng.integers(0, len(centres), n)]
        xy = picks + rng.normal(size=(n, 2)) * spread
        return np.clip(xy, [west, south], [east, north])

    poi = around(N_POIS)
    pd.DataFrame({"lon": poi[:, 0], "lat": poi[:, 1],
                  "category": rng.choice(CATEGORIES, N_POIS)}).to_csv(folder / "pois.csv", index=False)
    origin, dest = around(n_trips), around(n_trips)
    pd.DataFrame({"o_lon": origin[:, 0], "o_lat": origin[:, 1], "d_lon": dest[:, 0], "d_lat": dest[:, 1],
                  "time": rng.uniform(0, 24, n_trips).round(3) % 24}).to_csv(folder / "trips.csv", index=False)


def measure(name: str, src: Path, seed: int) -> dict[str, Any]:
    """One CLI build in a subprocess: wall seconds and peak RSS (``/usr/bin/time -v``), plus what it built."""
    bbox, n_trips = POINTS[name]
    with tempfile.TemporaryDirectory(prefix="build-trips-") as tmp:
        work = Path(tmp)
        synthetic_inputs(work, bbox, n_trips, seed)
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        command = ["/usr/bin/time", "-v", sys.executable, "-m", "urbanprofile.cli", "build", "synthetic",
                   f"--boundary={','.join(map(str, bbox))}", "--h3-res", "9", "--pois", str(work / "pois.csv"),
                   "--trips", str(work / "trips.csv"), "--out", str(work / "out")]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-3:]
            return {"point": name, "failed": f"exit {done.returncode}: {' | '.join(tail)}", "trips": n_trips}
        # Then load (and validate) the written dataset in a fresh process, as every later command does.
        load = ("import sys; from urbanprofile.data import load_dataset; city = load_dataset(sys.argv[1]); "
                "print(sorted(city.views))")
        loaded = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", load, str(work / "out")], env=env,
                                capture_output=True, text=True, check=False)
        manifest = json.loads((work / "out" / "manifest.json").read_text())
        od_rows = len(pd.read_parquet(work / "out" / "od_flows.parquet"))
        return {"point": name, "cells": manifest["regions"]["count"], "trips": n_trips, "pois": N_POIS,
                "od_nonzero": od_rows, **_timed(done.stderr, ""),
                **(_timed(loaded.stderr, "load_") if loaded.returncode == 0 else {"load_failed": loaded.stderr[-300:]})}


def _timed(report: str, prefix: str) -> dict[str, float]:
    """Wall seconds and peak RSS (GB) from the report of ``/usr/bin/time -v``."""
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", report)
    assert peak is not None and wall is not None
    seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    return {f"{prefix}wall_s": round(seconds, 1), f"{prefix}peak_rss_gb": round(int(peak.group(1)) / 1e6, 3)}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["# Build with trips: peak memory (issue 22)", "",
             "`python benchmarks/build_trips_memory.py`: one `urbanprofile build --boundary W,S,E,N --h3-res 9 "
             f"--pois --trips` subprocess per row, {N_POIS:,} clustered POIs, trips with departure times "
             "(4 time-of-day patterns), seed 0, 1 thread; peak RSS and wall time from `/usr/bin/time -v`.", "",
             "Load: `load_dataset` (with validation) of the written folder in a fresh process. `before`: the code "
             "before the sparse trips build (issue 22), run with `--src` pointing at a `git archive` of commit "
             "81e8f16; `after`: this checkout. Wall times move with the load of the shared 2-core machine.", "",
             "| code | cells | trips | OD non-zeros | build s | build peak RSS GB | load s | load peak RSS GB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['label']} | {row['point']} | {row['trips']:,} | - | failed: {row['failed']} | | | |")
            continue
        lines.append(f"| {row['label']} | {row['cells']:,} | {row['trips']:,} | {row['od_nonzero']:,} | "
                     f"{row['wall_s']} | {row['peak_rss_gb']} | {row.get('load_wall_s', '-')} | "
                     f"{row.get('load_peak_rss_gb', '-')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args_parser = parser(__doc__, parts=",".join(POINTS), out=RESULTS)
    args_parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src",
                             help="the src folder urbanprofile is imported from (default: this checkout's)")
    args_parser.add_argument("--label", default="after", help="name of this code version in the table")
    args = args_parser.parse_args()
    previous = RESULTS / "build_trips_memory.json"
    rows: list[dict[str, Any]] = json.loads(previous.read_text())["rows"] if previous.is_file() else []
    for name in [p for p in args.parts.split(",") if p]:
        if name not in POINTS:
            raise SystemExit(f"error: unknown part {name!r} (choose from {', '.join(POINTS)})")
        row = {"label": args.label, **measure(name, args.src, SEED)}
        print(json.dumps(row))
        rows = [r for r in rows if (r["label"], r["point"]) != (args.label, name)] + [row]
    write_results(args.out, "build_trips_memory", {"seed": SEED, "rows": rows}, markdown(rows))


if __name__ == "__main__":
    run(main)
