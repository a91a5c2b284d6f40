"""A seeded synthetic country: clustered cities over a rural background, with POIs, trips and a boundary.

Cities sit at seeded places in a lon/lat box; their sizes follow a power law (Zipf's rank-size rule: the
k-th city holds about 1/k of the largest one's share). POIs are drawn around city centres (a Gaussian
whose spread grows with the square root of the city's share) or, for ``rural_share`` of them, anywhere in
the box; urban and rural POIs have different category mixes. Trips start in a city (weighted by its size)
and end either in the same city, at a distance that decays exponentially from the origin, or in another city
chosen by a gravity model (its size times ``exp(-distance / decay)``); a few start and end in the
countryside. Departure times have a morning and an evening peak.

Everything is written in chunks of ``chunk_rows`` rows through a Parquet writer, so the generator's own
memory stays flat (well under 1 GB at the default chunk) whatever the number of POIs or trips; each chunk
draws from its own child of one ``numpy.random.SeedSequence``, so the same arguments give the same files.

Files written into ``--out``:
    pois.parquet      lon, lat, category
    trips.parquet     o_lon, o_lat, d_lon, d_lat, time (hour of day in [0, 24))
    boundary.geojson  the box as one polygon (EPSG:4326)
    labels.parquet    (with ``--labels-res R``) region_id (H3 cell of resolution R whose centre is in the box),
                      ``activity``: a count-like indicator driven by the same city mixture, with noise
    country.json      the arguments, the cities and the counts

Run:  python benchmarks/synthetic_country.py --out DIR --pois 20_000_000 --trips 2_000_000 --cells 4_000_000
      (``--cells`` sizes the box for about that many H3 resolution-9 cells; or give ``--bbox W,S,E,N``)
Import:  ``from synthetic_country import CountrySpec, generate`` (this folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

KM_PER_DEG = 111.32
#: Category mixes: cities have shops, food and offices; the countryside farms, fuel and churches.
CATEGORIES = ("food", "shop", "office", "school", "health", "leisure", "transport", "hotel", "farm", "fuel",
              "worship", "industry")
URBAN_MIX = np.array([22, 20, 14, 6, 6, 9, 8, 5, 0.5, 2, 3, 4.5])
RURAL_MIX = np.array([6, 6, 2, 4, 2, 8, 3, 2, 40, 8, 9, 10])
#: Where a box sized by cells is centred (mid-latitudes, as in Europe): lon, lat.
DEFAULT_CENTRE = (8.0, 47.0)


@dataclass(frozen=True)
class CountrySpec:
    """What to generate.

    Attributes:
        bbox: West, south, east, north in degrees (EPSG:4326).
        n_pois: POIs to write.
        n_trips: Trips to write.
        n_cities: Cities (centres) in the box; about one per 2,000 km² by default (see :func:`default_cities`).
        rural_share: Share of POIs (and 5% of trips) scattered over the whole box.
        zipf: Exponent of the rank-size rule (1: the k-th city has 1/k of the first one's share).
        largest_city_km: Spread (Gaussian sigma, km) of the largest city; others scale with sqrt(share).
        intra_city_share: Share of city trips that end in their own city.
        decay_km: Distance scale of the gravity model between cities.
        seed: Seed of everything.
        chunk_rows: Rows generated and written at a time (bounds the generator's memory).
        labels_resolution: H3 resolution of ``labels.parquet`` (``None``: no labels).
    """

    bbox: tuple[float, float, float, float]
    n_pois: int
    n_trips: int = 0
    n_cities: int | None = None
    rural_share: float = 0.15
    zipf: float = 1.0
    largest_city_km: float = 12.0
    intra_city_share: float = 0.8
    decay_km: float = 60.0
    seed: int = 0
    chunk_rows: int = 1_000_000
    labels_resolution: int | None = None

    def check(self) -> None:
        """Refuse impossible arguments with one line each (``ValueError``)."""
        west, south, east, north = self.bbox
        if not (-180 <= west < east <= 180 and -85 <= south < north <= 85):
            raise ValueError(f"bbox must be W,S,E,N with W < E and S < N in degrees, got {self.bbox}")
        if self.n_pois < 0 or self.n_trips < 0:
            raise ValueError("--pois and --trips must be >= 0")
        if self.chunk_rows < 1:
            raise ValueError(f"chunk rows must be >= 1, got {self.chunk_rows}")
        if not 0 <= self.rural_share <= 1 or not 0 <= self.intra_city_share <= 1:
            raise ValueError("shares must be in [0, 1]")
        if self.n_cities is not None and self.n_cities < 1:
            raise ValueError(f"--cities must be >= 1, got {self.n_cities}")
        if self.labels_resolution is not None and not 0 <= self.labels_resolution <= 15:
            raise ValueError(f"H3 resolution must be in 0-15, got {self.labels_resolution}")


@dataclass
class Cities:
    """City centres (lon, lat), shares of the urban POIs (sum 1) and spreads in km."""

    lon: np.ndarray
    lat: np.ndarray
    share: np.ndarray
    sigma_km: np.ndarray
    km_per_deg_lon: float = field(default=KM_PER_DEG)

    def distances_km(self) -> np.ndarray:
        """City-to-city distances (equirectangular, enough at country scale)."""
        dx = (self.lon[:, None] - self.lon[None, :]) * self.km_per_deg_lon
        dy = (self.lat[:, None] - self.lat[None, :]) * KM_PER_DEG
        return np.hypot(dx, dy)


def bbox_for_cells(n_cells: int, resolution: int = 9, centre: tuple[float, float] = DEFAULT_CENTRE,
                   aspect: float = 1.5) -> tuple[float, float, float, float]:
    """A box (W, S, E, N) holding about ``n_cells`` H3 cells of ``resolution``, ``aspect`` times wider than tall."""
    import h3

    area_km2 = n_cells * h3.average_hexagon_area(resolution, "km^2")
    height_km = math.sqrt(area_km2 / aspect)
    lon0, lat0 = centre
    half_h = height_km / KM_PER_DEG / 2
    half_w = aspect * height_km / (KM_PER_DEG * math.cos(math.radians(lat0))) / 2
    return (round(lon0 - half_w, 6), round(lat0 - half_h, 6), round(lon0 + half_w, 6), round(lat0 + half_h, 6))


def default_cities(bbox: tuple[float, float, float, float]) -> int:
    """About one city per 2,000 km² (a town of some size every ~45 km), at least 3, at most 5,000."""
    west, south, east, north = bbox
    lat0 = math.radians((south + north) / 2)
    area = (east - west) * KM_PER_DEG * math.cos(lat0) * (north - south) * KM_PER_DEG
    return int(np.clip(round(area / 2_000), 3, 5_000))


def make_cities(spec: CountrySpec) -> Cities:
    """Seeded city centres with power-law shares; the largest ones are kept off the box's edges."""
    west, south, east, north = spec.bbox
    n = spec.n_cities or default_cities(spec.bbox)
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 0]))
    share = 1.0 / np.arange(1, n + 1) ** spec.zipf
    share /= share.sum()
    km_per_deg_lon = KM_PER_DEG * math.cos(math.radians((south + north) / 2))
    sigma_km = spec.largest_city_km * np.sqrt(share / share[0])
    # A margin of two spreads (capped at a quarter of the box) keeps a city's mass inside the box.
    margin_lon = np.minimum(2 * sigma_km / km_per_deg_lon, (east - west) / 4)
    margin_lat = np.minimum(2 * sigma_km / KM_PER_DEG, (north - south) / 4)
    lon = rng.uniform(west + margin_lon, east - margin_lon)
    lat = rng.uniform(south + margin_lat, north - margin_lat)
    return Cities(lon=lon, lat=lat, share=share, sigma_km=sigma_km, km_per_deg_lon=km_per_deg_lon)


def _chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    """(chunk number, rows) covering ``total`` rows."""
    for k, start in enumerate(range(0, total, size)):
        yield k, min(size, total - start)


def _clip(spec: CountrySpec, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    west, south, east, north = spec.bbox
    # Just inside the box, so every point falls in a cell of a build cut from the same box.
    eps = 1e-7
    return np.clip(lon, west + eps, east - eps), np.clip(lat, south + eps, north - eps)


def _around(rng: np.random.Generator, cities: Cities, city: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points scattered around the given cities' centres (Gaussian, each city's own spread)."""
    sigma = cities.sigma_km[city]
    lon = cities.lon[city] + rng.normal(size=len(city)) * sigma / cities.km_per_deg_lon
    lat = cities.lat[city] + rng.normal(size=len(city)) * sigma / KM_PER_DEG
    return lon, lat


def poi_chunks(spec: CountrySpec, cities: Cities) -> Iterator[pa.Table]:
    """The POIs, one Arrow table per chunk."""
    west, south, east, north = spec.bbox
    urban_p = URBAN_MIX / URBAN_MIX.sum()
    rural_p = RURAL_MIX / RURAL_MIX.sum()
    names = np.array(CATEGORIES)
    for k, rows in _chunks(spec.n_pois, spec.chunk_rows):
        rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 1, k]))
        rural = rng.random(rows) < spec.rural_share
        city = rng.choice(len(cities.share), size=rows, p=cities.share)
        lon, lat = _around(rng, cities, city)
        lon[rural] = rng.uniform(west, east, int(rural.sum()))
        lat[rural] = rng.uniform(south, north, int(rural.sum()))
        lon, lat = _clip(spec, lon, lat)
        category = np.where(rural, rng.choice(len(names), size=rows, p=rural_p),
                            rng.choice(len(names), size=rows, p=urban_p))
        yield pa.table({"lon": lon, "lat": lat, "category": pa.array(names[category])})


def trip_chunks(spec: CountrySpec, cities: Cities) -> Iterator[pa.Table]:
    """The trips, one Arrow table per chunk."""
    west, south, east, north = spec.bbox
    n = len(cities.share)
    # Gravity model between cities: destination j of origin i with weight share_j * exp(-d_ij / decay), j != i.
    gravity = cities.share[None, :] * np.exp(-cities.distances_km() / spec.decay_km)
    np.fill_diagonal(gravity, 0.0)
    totals = gravity.sum(axis=1, keepdims=True)
    cumulative = np.cumsum(np.divide(gravity, totals, out=np.zeros_like(gravity), where=totals > 0), axis=1)
    for k, rows in _chunks(spec.n_trips, spec.chunk_rows):
        rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 2, k]))
        origin_city = rng.choice(n, size=rows, p=cities.share)
        o_lon, o_lat = _around(rng, cities, origin_city)
        # Within a city: a hop from the origin whose length decays exponentially (mean half the city's spread).
        hop = rng.exponential(0.5 * cities.sigma_km[origin_city])
        angle = rng.uniform(0, 2 * np.pi, rows)
        d_lon = o_lon + hop * np.cos(angle) / cities.km_per_deg_lon
        d_lat = o_lat + hop * np.sin(angle) / KM_PER_DEG
        between = (rng.random(rows) >= spec.intra_city_share) & (n > 1)
        if between.any():
            dest_city = np.empty(int(between.sum()), dtype=int)
            u = rng.random(len(dest_city))
            origins = origin_city[between]
            for i in np.unique(origins):  # one search per origin city, not an (rows x cities) matrix
                mine = origins == i
                dest_city[mine] = np.minimum(np.searchsorted(cumulative[i], u[mine], side="right"), n - 1)
            d_lon[between], d_lat[between] = _around(rng, cities, dest_city)
        # The countryside: 5% of trips between two places anywhere, a hop apart.
        rural = rng.random(rows) < 0.05 * (spec.rural_share > 0)
        m = int(rural.sum())
        o_lon[rural], o_lat[rural] = rng.uniform(west, east, m), rng.uniform(south, north, m)
        hop_r, angle_r = rng.exponential(5.0, m), rng.uniform(0, 2 * np.pi, m)
        d_lon[rural] = o_lon[rural] + hop_r * np.cos(angle_r) / cities.km_per_deg_lon
        d_lat[rural] = o_lat[rural] + hop_r * np.sin(angle_r) / KM_PER_DEG
        o_lon, o_lat = _clip(spec, o_lon, o_lat)
        d_lon, d_lat = _clip(spec, d_lon, d_lat)
        peak = rng.random(rows)
        hours = np.where(peak < 0.4, rng.normal(8.0, 1.5, rows),
                         np.where(peak < 0.8, rng.normal(17.5, 2.0, rows), rng.uniform(0, 24, rows)))
        hours = np.round(np.mod(hours, 24.0), 3) % 24.0  # rounding 23.9996 up must not give 24
        yield pa.table({"o_lon": o_lon, "o_lat": o_lat, "d_lon": d_lon, "d_lat": d_lat, "time": hours})


def urban_intensity(cities: Cities, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """The POI density the city mixture gives a place (relative units), computed city by city."""
    density = np.zeros(len(lon))
    for c in range(len(cities.share)):
        dx = (lon - cities.lon[c]) * cities.km_per_deg_lon
        dy = (lat - cities.lat[c]) * KM_PER_DEG
        s2 = cities.sigma_km[c] ** 2
        density += cities.share[c] / s2 * np.exp(-(dx * dx + dy * dy) / (2 * s2))
    return density


def label_chunks(spec: CountrySpec, cities: Cities) -> Iterator[pa.Table]:
    """``activity`` per H3 cell (centre inside the box): grows with the city density, multiplicative noise."""
    import h3

    assert spec.labels_resolution is not None
    west, south, east, north = spec.bbox
    box = h3.LatLngPoly([(south, west), (south, east), (north, east), (north, west)])
    cells = sorted(h3.polygon_to_cells(box, spec.labels_resolution))
    for k, rows in _chunks(len(cells), spec.chunk_rows):
        rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 3, k]))
        ids = cells[k * spec.chunk_rows:k * spec.chunk_rows + rows]
        centres = np.array([h3.cell_to_latlng(c) for c in ids])
        intensity = urban_intensity(cities, centres[:, 1], centres[:, 0])
        scale = 200.0 / float(np.max(cities.share / cities.sigma_km ** 2))  # the largest centre: about 200
        activity = rng.poisson(1.0 + scale * intensity * rng.lognormal(0.0, 0.5, rows))
        yield pa.table({"region_id": pa.array(ids, type=pa.string()), "activity": activity.astype(float)})


def _write(path: Path, chunks: Iterator[pa.Table]) -> int:
    """Write chunks into one Parquet file (one row group each) beside ``path``, then move it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    rows = 0
    writer: pq.ParquetWriter | None = None
    try:
        for table in chunks:
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
            writer.write_table(table)
            rows += table.num_rows
        if writer is None:
            return 0
        writer.close()
        writer = None
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return rows


def generate(spec: CountrySpec, out: Path) -> dict[str, Any]:
    """Write the country's files into ``out`` (created) and return what was written (also in country.json).

    Raises:
        ValueError: Impossible arguments (see :meth:`CountrySpec.check`).
    """
    spec.check()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cities = make_cities(spec)
    west, south, east, north = spec.bbox
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    boundary = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"name": "synthetic country"},
         "geometry": {"type": "Polygon", "coordinates": [ring]}}]}
    (out / "boundary.geojson").write_text(json.dumps(boundary))
    counts = {"pois": _write(out / "pois.parquet", poi_chunks(spec, cities)) if spec.n_pois else 0,
              "trips": _write(out / "trips.parquet", trip_chunks(spec, cities)) if spec.n_trips else 0}
    if spec.labels_resolution is not None:
        counts["labelled_cells"] = _write(out / "labels.parquet", label_chunks(spec, cities))
    summary = {"spec": dataclasses.asdict(spec), "n_cities": len(cities.share), "counts": counts,
               "largest_cities": [{"lon": round(float(cities.lon[i]), 4), "lat": round(float(cities.lat[i]), 4),
                                   "share": round(float(cities.share[i]), 4),
                                   "sigma_km": round(float(cities.sigma_km[i]), 2)}
                                  for i in range(min(10, len(cities.share)))],
               "seconds": round(time.perf_counter() - start, 1)}
    (out / "country.json").write_text(json.dumps(summary, indent=1))
    return summary


def h3_polygons(cells: list[str]) -> np.ndarray:
    """Shapely polygons (lon/lat) of H3 cells, made in vectorised groups of equal vertex count."""
    import h3
    import shapely

    rings = [h3.cell_to_boundary(c) for c in cells]
    out = np.empty(len(cells), dtype=object)
    sizes = np.array([len(r) for r in rings])
    for size in np.unique(sizes):
        where = np.flatnonzero(sizes == size)
        latlng = np.array([rings[i] for i in where])  # (n, size, 2) as (lat, lng)
        out[where] = shapely.polygons(latlng[:, :, ::-1])
    return out


def write_dataset(country: Path, out: Path, name: str = "synthetic-country") -> Path:
    """A built dataset folder straight from the generated files: the labelled H3 cells as regions, POI counts
    per cell, the ``activity`` label. The files ``urbanprofile build --boundary --h3-res --pois --labels`` writes
    (without its border ring of cells whose centre is outside the box), made in a fraction of its time, for
    benchmarks of what comes after the build (embed, evaluate) at sizes where the build itself is the slow part.

    Raises:
        FileNotFoundError: ``country`` has no ``labels.parquet`` (generate with ``labels_resolution``).
    """
    import geopandas as gpd
    import h3
    import pandas as pd

    from urbanprofile.data.city import CityData
    from urbanprofile.data.loaders.built import write_built

    summary = json.loads((country / "country.json").read_text())
    resolution = summary["spec"]["labels_resolution"]
    labels = pd.read_parquet(country / "labels.parquet").set_index("region_id")
    ids = pd.Index(labels.index.astype(str), name="region_id")
    counts = np.zeros((len(ids), len(CATEGORIES)), dtype=np.int64)
    code = {c: i for i, c in enumerate(CATEGORIES)}
    for batch in pq.ParquetFile(country / "pois.parquet").iter_batches(batch_size=500_000):
        lon, lat = batch.column("lon").to_numpy(), batch.column("lat").to_numpy()
        cells = [h3.latlng_to_cell(y, x, resolution) for y, x in zip(lat.tolist(), lon.tolist(), strict=True)]
        rows = ids.get_indexer(cells)
        cats = np.array([code[c] for c in batch.column("category").to_pylist()])
        inside = rows >= 0  # POIs in border cells (centre outside the box) are not counted
        np.add.at(counts, (rows[inside], cats[inside]), 1)
    centres = np.array([h3.cell_to_latlng(c) for c in ids])
    regions = gpd.GeoDataFrame({"lon": centres[:, 1], "lat": centres[:, 0]}, index=ids,
                               geometry=h3_polygons(list(ids)), crs="EPSG:4326")
    poi_counts = pd.DataFrame(counts, index=ids, columns=list(CATEGORIES))
    targets = pd.DataFrame({"activity": labels["activity"].to_numpy(dtype=float)}, index=ids)
    city = CityData(name=name, regions=regions, views={"poi_counts": poi_counts}, targets=targets,
                    meta={"region_kind": "h3", "h3_resolution": resolution})
    return write_built(city, out, {"city": name, "build_command": f"synthetic_country.write_dataset({country})",
                                   "units": {"poi_counts": "POIs", "activity": "count"}})


def _count(text: str) -> int:
    """``20_000_000``, ``20M``, ``500k`` or ``2e6`` as a whole number."""
    value = text.strip().lower().replace("_", "").replace(",", "")
    factor = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(value[-1:], 1)
    number = float(value[:-1] if factor > 1 else value)
    if number < 0 or number * factor != int(number * factor):
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(number * factor)


def _bbox(text: str) -> tuple[float, float, float, float]:
    parts = text.split(",")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"--bbox must be W,S,E,N, got {text!r}")
    try:
        west, south, east, north = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bbox must be four numbers, got {text!r}") from None
    return west, south, east, north


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    args.add_argument("--out", type=Path, required=True, help="folder to write into (created)")
    args.add_argument("--pois", type=_count, default=_count("1M"), help="POIs (e.g. 20_000_000 or 20M)")
    args.add_argument("--trips", type=_count, default=0, help="trips (e.g. 2_000_000)")
    where = args.add_mutually_exclusive_group()
    where.add_argument("--bbox", type=_bbox, help="the country's box W,S,E,N in degrees")
    where.add_argument("--cells", type=_count, help="size the box for about this many H3 cells (--cells-res)")
    args.add_argument("--cells-res", type=int, default=9, help="H3 resolution --cells counts (default 9)")
    args.add_argument("--cities", type=int, default=None, help="cities (default: one per ~2,000 km²)")
    args.add_argument("--labels-res", type=int, default=None, help="also write labels.parquet per H3 cell of this "
                      "resolution")
    args.add_argument("--chunk-rows", type=_count, default=1_000_000, help="rows generated at a time")
    args.add_argument("--seed", type=int, default=0)
    parsed = args.parse_args(argv)
    bbox = parsed.bbox or bbox_for_cells(parsed.cells or 1_000_000, parsed.cells_res)
    spec = CountrySpec(bbox=bbox, n_pois=parsed.pois, n_trips=parsed.trips, n_cities=parsed.cities,
                       seed=parsed.seed, chunk_rows=parsed.chunk_rows, labels_resolution=parsed.labels_res)
    try:
        summary = generate(spec, parsed.out)
    except ValueError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    print(json.dumps({"out": str(parsed.out), "bbox": list(bbox), **summary["counts"],
                      "cities": summary["n_cities"], "seconds": summary["seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
