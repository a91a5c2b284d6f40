"""The data model, its validation, the synthetic city and the real-data loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from urbanprofile.data import CityData, discover, load_dataset, make_synthetic_city, task_data
from urbanprofile.errors import DataError, MethodUnavailableError


def test_synthetic_city_is_seeded_and_valid() -> None:
    a = make_synthetic_city(n_regions=50, random_state=3)
    b = make_synthetic_city(n_regions=50, random_state=3)
    c = make_synthetic_city(n_regions=50, random_state=4)
    pd.testing.assert_frame_equal(a.views["poi_counts"], b.views["poi_counts"])
    assert not a.views["poi_counts"].equals(c.views["poi_counts"])
    assert a.regions.index.name == "region_id" and a.regions.crs.to_epsg() == 4326
    assert a.views["od_flows"].shape == (50, 50)


def test_synthetic_city_has_real_structure(city: CityData) -> None:
    # Land use is spatially autocorrelated: neighbours share a dominant class more often than chance.
    district = city.regions["landuse_district"]
    same = [district[r] == district[n] for r, ns in city.neighbors.items() for n in ns]
    chance = (district.value_counts(normalize=True) ** 2).sum()
    assert np.mean(same) > chance + 0.1
    # Labels depend on the views: check-ins grow with POI counts.
    assert np.corrcoef(city.views["poi_counts"].sum(axis=1), city.targets["checkin"])[0, 1] > 0.5
    # Gravity flows decay with distance.
    xy = city.coordinates_km()
    dist = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    od = city.views["od_flows"].to_numpy()
    assert od[dist < 2].mean() > od[dist > 4].mean()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.views.__setitem__("poi_counts", c.views["poi_counts"].iloc[:-1]), "has 63 regions"),
        (lambda c: c.views["poi_counts"].iloc.__setitem__((0, 0), np.nan), "NaN"),
        (lambda c: c.views["landuse_counts"].iloc.__setitem__((2, 1), -1), "negative counts \\(region 2\\)"),
        (lambda c: c.views.__setitem__("od_flows", c.views["od_flows"].iloc[:, :-1]), "must be square"),
        (lambda c: setattr(c, "regions", c.regions.set_crs(None, allow_override=True)), "no CRS"),
        (lambda c: c.neighbors.__setitem__(0, [999]), "unknown region 999"),
    ],
)
def test_validate_names_what_is_wrong(city: CityData, mutate, message: str) -> None:
    mutate(city)
    with pytest.raises(DataError, match=message):
        city.validate()


def test_duplicate_region_ids_are_refused(city: CityData) -> None:
    ids = city.regions.index.to_numpy().copy()
    ids[1] = ids[0]
    city.regions.index = pd.Index(ids, name="region_id")
    with pytest.raises(DataError, match="duplicate region_id"):
        city.validate()


def test_missing_view_is_a_one_line_error(city: CityData) -> None:
    with pytest.raises(MethodUnavailableError, match="has no 'images' view"):
        city.view("images")


def test_subset_restricts_square_views(city: CityData) -> None:
    part = city.subset(city.region_ids[:10])
    assert part.views["od_flows"].shape == (10, 10)
    part.validate()


def test_discovery_finds_a_dropped_in_city(make_data_dir) -> None:
    root = make_data_dir()
    assert "hafusion-testcity" in discover(root)
    city = load_dataset("hafusion-testcity", root)
    assert city.n_regions == 30 and city.has_locations
    assert city.meta["paper_folds"]["n_splits"] == 10  # not a peer city: 10 shuffled folds


# -- real data -----------------------------------------------------------------------------------------
def test_real_datasets_are_discovered(data_dir: Path) -> None:
    names = set(discover(data_dir))
    assert {"hafusion-nyc", "hafusion-chicago", "cityview-beijing", "cityview-guangzhou"} <= names


def test_nyc_has_polygons_neighbors_and_patterns(data_dir: Path) -> None:
    nyc = load_dataset("hafusion-nyc", data_dir)
    assert nyc.n_regions == 180
    assert nyc.regions.geometry.geom_type.isin(["Polygon", "MultiPolygon"]).all()
    assert nyc.regions["lon"].between(-74.1, -73.8).all() and nyc.regions["lat"].between(40.6, 40.9).all()
    assert sum(len(v) for v in nyc.neighbors.values()) > 300
    patterns = nyc.od_patterns()
    assert patterns.shape == (7, 180, 180)
    np.testing.assert_array_equal(patterns.sum(0), nyc.views["od_flows"].to_numpy())
    assert nyc.regions["landuse_district"].nunique() == 13
    assert task_data(nyc, "checkin").n_zero_dropped == 0


def test_chicago_centroids_and_zero_checkins(data_dir: Path) -> None:
    chicago = load_dataset("hafusion-chicago", data_dir)
    assert list(chicago.region_ids[:2]) == [1, 2]  # community area numbers
    assert chicago.regions["lat"].between(41.6, 42.1).all()
    checkin = task_data(chicago, "checkin")
    assert len(checkin.y) == 74 and checkin.n_zero_dropped == 3


def test_cityview_gdp_fill_is_missing(data_dir: Path) -> None:
    beijing = load_dataset("cityview-beijing", data_dir)
    assert beijing.n_regions == 4587
    assert beijing.meta["gdp_fill_missing"] == int(beijing.targets["gdp"].isna().sum()) > 500
    assert not (beijing.targets["gdp"] == 10000.0).any()
    assert beijing.views == {}
