"""Shared fixtures: seeded synthetic cities, the real data directory, and malformed data directories."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from urbanprofile.data import CityData, make_synthetic_city


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
