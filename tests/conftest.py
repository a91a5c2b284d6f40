"""Shared fixtures: seeded synthetic cities, the real data directory, and malformed data directories."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from urbanprofile.data import CityData, make_synthetic_city
from urbanprofile.data.registry import FAMILIES
from urbanprofile.evaluation.protocols import PROTOCOL_REGISTRY
from urbanprofile.heads.registry import HEADS
from urbanprofile.methods import METHODS


@contextlib.contextmanager
def _registries_kept() -> Iterator[None]:
    registries = (METHODS, HEADS, FAMILIES, PROTOCOL_REGISTRY)
    saved = [(dict(r.items), dict(r.broken)) for r in registries]
    try:
        yield
    finally:
        for registry, (items, broken) in zip(registries, saved, strict=True):
            registry.items.clear()
            registry.items.update(items)
            registry.broken.clear()
            registry.broken.update(broken)


@pytest.fixture(autouse=True, scope="module")
def _registries_restored_per_module() -> Iterator[None]:
    """What a module-scoped fixture registers is gone when its module ends."""
    with _registries_kept():
        yield


@pytest.fixture(autouse=True)
def _registries_restored() -> Iterator[None]:
    """Every test leaves the registries as it found them: a method, head, family or protocol a test registers
    (or replaces) is gone after it, so no test sees another's entries."""
    with _registries_kept():
        yield


@pytest.fixture
def city() -> CityData:
    return make_synthetic_city(n_regions=64, n_poi_categories=12, random_state=0)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real benchmark data (CI sets URBANPROFILE_DATA); tests that need it skip without it."""
    value = os.environ.get("URBANPROFILE_DATA")
    if not value or not Path(value).is_dir():
        pytest.skip("URBANPROFILE_DATA is not set to the benchmark data directory")
    return Path(value)


def write_hafusion_city(root: Path, name: str = "testcity", n: int = 30, seed: int = 0) -> Path:
    """Write a small, valid city in the HAFusion layout from a synthetic city (no real data copied)."""
    city = make_synthetic_city(n_regions=n, random_state=seed)
    folder = root / "hafusion" / name
    folder.mkdir(parents=True)
    np.save(folder / "poi_dist.npy", city.views["poi_counts"].to_numpy().astype(np.int32))
    np.save(folder / "landUse_dist.npy", city.views["landuse_counts"].to_numpy().astype(np.int32))
    np.save(folder / "mob_dist.npy", city.views["od_flows"].to_numpy().astype(np.int64))
    np.save(folder / "mob-adj.npy", city.views["od_flows"].to_numpy().astype(float))
    np.save(folder / "poi_simi.npy", city.views["poi_similarity"].to_numpy())
    np.save(folder / "landUse_simi.npy", city.views["landuse_similarity"].to_numpy())
    np.save(folder / "check_counts.npy", city.targets["checkin"].to_numpy().astype(np.int64))
    np.save(folder / "crime_counts.npy", city.targets["crime"].to_numpy())
    np.save(folder / "serviceCall_counts.npy", city.targets["service_calls"].to_numpy().astype(np.int32))
    regions = city.regions[["geometry"]].reset_index()
    (folder / "regions").mkdir()
    regions.to_file(folder / "regions" / "cells.shp")
    return folder


@pytest.fixture
def make_data_dir(tmp_path: Path) -> Callable[..., Path]:
    def make(n: int = 30) -> Path:
        write_hafusion_city(tmp_path, n=n)
        return tmp_path

    return make


def write_raw_city(folder: Path, seed: int = 0, n_pois: int = 600, n_trips: int = 300) -> dict[str, Path]:
    """Write the raw files a city analyst brings (seeded): a 6 x 5 grid of region polygons with string ids and
    names, POIs (CSV, some outside the grid, one unknown category), land use, trips (CSV, one missing
    coordinate) and a labels table keyed by region id. Cells are 0.01 degrees, the grid spans lon 0-0.06,
    lat 0-0.05, so the region of a point is known without a GIS."""
    import geopandas as gpd
    import pandas as pd
    from shapely.geometry import box

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ids, names, cells = [], [], []
    for i in range(6):
        for j in range(5):
            ids.append(f"c{i}{j}")
            names.append(f"block {i}-{j}")
            cells.append(box(i * 0.01, j * 0.01, (i + 1) * 0.01, (j + 1) * 0.01))
    regions = gpd.GeoDataFrame({"region_id": ids, "name": names, "households": rng.integers(10, 500, len(ids))},
                               geometry=cells, crs="EPSG:4326")
    regions.to_file(folder / "regions.gpkg")
    pois = pd.DataFrame({
        "lon": rng.uniform(-0.005, 0.0651, n_pois) + 1e-7,
        "lat": rng.uniform(0.0005, 0.0495, n_pois) + 1e-7,
        "category": rng.choice(["food", "shop", "school"], n_pois),
    })
    pois.loc[:4, "category"] = "casino"
    pois.to_csv(folder / "pois.csv", index=False)
    landuse = gpd.GeoDataFrame({"class": ["park", "housing"]},
                               geometry=[box(0, 0, 0.03, 0.05), box(0.03, 0, 0.06, 0.05)], crs="EPSG:4326")
    landuse.to_file(folder / "landuse.geojson")
    trips = pd.DataFrame({
        "o_lon": rng.uniform(0.0001, 0.0599, n_trips), "o_lat": rng.uniform(0.0001, 0.0499, n_trips),
        "d_lon": rng.uniform(0.0001, 0.0599, n_trips), "d_lat": rng.uniform(0.0001, 0.0499, n_trips),
        "time": pd.date_range("2024-03-01", periods=n_trips, freq="37min").astype(str),
    })
    trips.loc[7, "d_lat"] = np.nan
    trips.to_csv(folder / "trips.csv", index=False)
    labels = pd.DataFrame({"region_id": ids, "crime": rng.poisson(20, len(ids)).astype(float)})
    labels.to_csv(folder / "labels.csv", index=False)
    return {k: folder / f for k, f in [("regions", "regions.gpkg"), ("pois", "pois.csv"),
                                       ("landuse", "landuse.geojson"), ("trips", "trips.csv"),
                                       ("labels", "labels.csv")]}


@pytest.fixture
def raw_city(tmp_path: Path) -> dict[str, Path]:
    return write_raw_city(tmp_path / "raw")
