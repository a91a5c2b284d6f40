"""Indicators attached to regions by areal interpolation (tobler): values, coverage, errors, and the NYC ACS set."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import assert_user_error
from helpers import run_cli_process as run_cli

from urbanprofile.benchmark.runner import BenchmarkPlan, run_benchmark
from urbanprofile.data import CityData, load_dataset, make_synthetic_city
from urbanprofile.data.indicators import apply_indicator_sets, write_indicator_set
from urbanprofile.data.interpolate import attach_by_key, interpolate, read_indicator_layer, read_weights
from urbanprofile.errors import DataError

gpd = pytest.importorskip("geopandas")
pytest.importorskip("tobler")
from shapely.geometry import Point, Polygon, box  # noqa: E402


@pytest.fixture(scope="module")
def grid() -> CityData:
    return make_synthetic_city(n_regions=36, random_state=0)


def _cell(grid: CityData, i: int) -> tuple[float, float, float, float]:
    return tuple(grid.regions.geometry.iloc[i].bounds)  # type: ignore[return-value]


def _sources(grid: CityData) -> gpd.GeoDataFrame:
    """A = cells 0 and 1 exactly; B = cell 2 and the left half of cell 3; C = far outside every region."""
    cells = grid.regions.geometry
    a = cells.iloc[0].union(cells.iloc[1])
    l3, b3, r3, t3 = _cell(grid, 3)
    b = cells.iloc[2].union(cells.iloc[3].intersection(box(l3, b3, (l3 + r3) / 2, t3)))
    c = box(10.0, 10.0, 10.1, 10.1)
    return gpd.GeoDataFrame({"name": ["A", "B", "C"], "people": [100.0, 90.0, 5.0], "rate": [10.0, 20.0, 30.0]},
                            geometry=[a, b, c], crs="EPSG:4326")


def test_area_weighted_splits_counts_averages_rates_and_leaves_the_rest_missing(grid: CityData) -> None:
    got = interpolate(grid.regions, _sources(grid), ["people"], ["rate"])
    people, rate, coverage = got.values["people"], got.values["rate"], got.coverage
    ids = grid.region_ids
    assert got.method == "area-weighted"
    assert people[ids[0]] == pytest.approx(50, rel=0.01) and people[ids[1]] == pytest.approx(50, rel=0.01)
    assert people[ids[2]] == pytest.approx(60, rel=0.02) and people[ids[3]] == pytest.approx(30, rel=0.02)
    assert rate[ids[0]] == pytest.approx(10) and rate[ids[3]] == pytest.approx(20)
    assert coverage[ids[3]] == pytest.approx(0.5, abs=0.01) and coverage[ids[0]] == pytest.approx(1, abs=1e-6)
    untouched = ids[4:]
    assert people[untouched].isna().all() and rate[untouched].isna().all()  # missing, never zero
    assert (coverage[untouched] == 0).all()
    assert any("not reached" in note for note in got.notes)


def test_other_crs_is_reprojected(grid: CityData) -> None:
    plain = interpolate(grid.regions, _sources(grid), ["people"], ["rate"]).values
    projected = interpolate(grid.regions, _sources(grid).to_crs("EPSG:3857"), ["people"], ["rate"]).values
    pd.testing.assert_frame_equal(plain, projected, rtol=1e-3)


def test_dasymetric_puts_counts_where_the_weights_are(grid: CityData) -> None:
    centre = [grid.regions.geometry.iloc[i].centroid for i in range(36)]
    weights = gpd.GeoDataFrame({"weight": [1.0, 1.0, 1.0, 1.0, 1.0, 2.0]},
                               geometry=[centre[0], Point(centre[0].x + 1e-4, centre[0].y),
                                         Point(centre[0].x, centre[0].y + 1e-4), centre[1], centre[2], centre[20]],
                               crs="EPSG:4326")
    got = interpolate(grid.regions, _sources(grid), ["people"], ["rate"], weights)
    ids = grid.region_ids
    assert got.method == "dasymetric"
    assert got.values["people"][ids[0]] == pytest.approx(75) and got.values["people"][ids[1]] == pytest.approx(25)
    assert got.values["people"][ids[2]] == pytest.approx(90)
    assert got.values["people"][ids[3]] == 0  # reached by B but holds no residents: a true zero count
    assert np.isnan(got.values["rate"][ids[3]])  # ... and no rate
    assert got.coverage[ids[20]] == 0 and np.isnan(got.values["people"][ids[20]])  # weight outside every source


def test_by_key_matches_ids_as_text(grid: CityData) -> None:
    table = pd.DataFrame({"rid": [str(i) for i in grid.region_ids[:5]], "v": np.arange(5.0)})
    got = attach_by_key(grid.region_ids, table, "rid", ["v"], "t.csv", grid.name)
    assert got.values["v"].iloc[:5].tolist() == [0, 1, 2, 3, 4] and got.values["v"].iloc[5:].isna().all()


def _bad(grid: CityData, case: str, tmp_path: Path) -> tuple[Callable[[], object], str]:
    sources = _sources(grid)
    if case == "no-crs":
        csv = tmp_path / "nocrs.csv"
        pd.DataFrame({"geometry": sources.geometry.to_wkt(), "people": sources["people"]}).to_csv(csv, index=False)
        return lambda: read_indicator_layer(csv), "nocrs.csv: the indicator layer has no CRS"
    if case == "key-matches-no-region":
        table = pd.DataFrame({"rid": ["0", "nowhere"], "v": [1.0, 2.0]})
        return lambda: attach_by_key(grid.region_ids, table, "rid", ["v"], "t.csv", grid.name), "key 'nowhere'"
    if case == "non-numeric":
        sources["rate"] = ["10", "x", "3"]
        return (lambda: interpolate(grid.regions, sources, [], ["rate"], source_name="src.gpkg", id_column="name"),
                "src.gpkg: column 'rate' is not numeric ('x' in feature 'B')")
    if case == "negative-extensive":
        sources.loc[1, "people"] = -4.0
        return (lambda: interpolate(grid.regions, sources, ["people"], [], source_name="src.gpkg", id_column="name"),
                "extensive column 'people' is negative (-4 in feature 'B')")
    if case == "weights-outside":
        far = gpd.GeoDataFrame({"weight": [1.0]}, geometry=[Point(50, 50)], crs="EPSG:4326")
        return lambda: interpolate(grid.regions, sources, ["people"], [], far), "none of the 1 weight points"
    if case == "invalid-geometry":
        bowtie = Polygon([(0, 45), (0.01, 45.01), (0.01, 45), (0, 45.01)])
        sources.loc[2, "geometry"] = bowtie
        return (lambda: interpolate(grid.regions, sources, ["people"], [], source_name="src.gpkg", id_column="name"),
                "feature 'C' has an invalid polygon")
    if case == "missing-column":
        return lambda: interpolate(grid.regions, sources, ["nope"], [], source_name="src.gpkg"), "no column 'nope'"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["no-crs", "key-matches-no-region", "non-numeric", "negative-extensive",
                                  "weights-outside", "invalid-geometry", "missing-column"])
def test_bad_input_is_one_line_naming_what(grid: CityData, case: str, tmp_path: Path) -> None:
    call, fragment = _bad(grid, case, tmp_path)
    with pytest.raises(DataError) as caught:
        call()
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_weights_csv_reads_points(tmp_path: Path) -> None:
    path = tmp_path / "pop.csv"
    pd.DataFrame({"longitude": [0.0, 0.01], "latitude": [45.0, 45.0], "pop": [3.0, 0.0]}).to_csv(path, index=False)
    points = read_weights(f"{path}:pop")
    assert points["weight"].tolist() == [3.0]  # zero weights carry nothing
    with pytest.raises(DataError, match="no weight column 'people'"):
        read_weights(f"{path}:people")


def test_stored_set_becomes_tasks(grid: CityData, tmp_path: Path) -> None:
    got = interpolate(grid.regions, _sources(grid), ["people"], ["rate"])
    write_indicator_set(tmp_path, grid.name, "demo", got, {"source": "test"})
    with pytest.raises(DataError, match="exists"):
        write_indicator_set(tmp_path, grid.name, "demo", got, {})
    city = apply_indicator_sets(make_synthetic_city(n_regions=36, random_state=0), tmp_path)
    assert {"people", "rate"} <= set(city.tasks)
    pd.testing.assert_series_equal(city.targets["people"], got.values["people"], check_names=False)


def test_cli_attach_then_evaluate_the_task(make_data_dir: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = make_data_dir()
    tmp_path = tmp_path_factory.mktemp("outside")  # outputs never go into the data directory
    city = load_dataset("hafusion-testcity", data_dir)
    west, south, east, north = city.regions.geometry.total_bounds
    middle = (west + east) / 2
    halves = gpd.GeoDataFrame({"zone": ["w", "e"], "households": [1000.0, 3000.0], "income": [40.0, 80.0]},
                              geometry=[box(west, south, middle, north), box(middle, south, east, north)],
                              crs="EPSG:4326").to_crs("EPSG:3857")
    source = tmp_path / "zones.gpkg"
    halves.to_file(source)
    out = tmp_path / "sets"
    made = run_cli("attach", "hafusion-testcity", "--indicators", str(source), "--extensive", "households",
                   "--intensive", "income", "--prefix", "z_", "--out", str(out), data_dir=data_dir)
    assert made.returncode == 0, made.stderr
    assert (out / "hafusion-testcity" / "zones.parquet").is_file() and "coverage:" in made.stdout
    monkeypatch.setenv("URBANPROFILE_INDICATORS", str(out))
    rows = run_benchmark(BenchmarkPlan(datasets=["hafusion-testcity"], methods=["raw-poi"], tasks=["z_income"],
                                       protocols=["nested"], seeds=[0]), data_dir, progress=False).rows
    monkeypatch.delenv("URBANPROFILE_INDICATORS")
    assert [(r["task"], r["status"]) for r in rows] == [("z_income", "ok")]
    negative = halves.assign(households=[-1.0, 3000.0])
    negative.to_file(tmp_path / "neg.gpkg")
    bad = run_cli("attach", "hafusion-testcity", "--indicators", str(tmp_path / "neg.gpkg"), "--extensive",
                  "households", "--id-column", "zone", "--out", str(tmp_path / "neg"), data_dir=data_dir)
    assert_user_error(bad, "neg.gpkg", "extensive column 'households' is negative", "feature 'w'")
    assert not (tmp_path / "neg").exists()  # nothing half-written
    inside = run_cli("attach", "hafusion-testcity", "--indicators", str(source), "--extensive", "households",
                     "--out", str(data_dir / "sets"), data_dir=data_dir)
    assert_user_error(inside, "inside the data directory")
    assert not (data_dir / "sets").exists()


@pytest.mark.skipif(importlib.util.find_spec("councilcount") is None, reason="councilcount is not installed")
def test_nyc_acs_set_on_manhattan(data_dir: Path) -> None:
    from urbanprofile.data.indicators import ACS_CAVEAT, nyc_acs_indicators

    city = load_dataset("hafusion-nyc", data_dir)
    got, info = nyc_acs_indicators(city, 2023)
    values = got.values
    # Manhattan's ACS 2019-2023 population is about 1.6 million; the 180 regions hold nearly all of it.
    assert 1.4e6 < values["acs_population"].sum() < 1.75e6
    assert {"acs_poverty", "acs_unemployment", "acs_no_vehicle", "acs_income_over_200k", "acs_density",
            "acs_bachelors_or_higher", "acs_income_under_10k", "acs_income_over_100k"} <= set(values.columns)
    assert ACS_CAVEAT in got.notes[0] and 25 <= info["n_ntas_with_residents"] <= 45
    assert values["acs_poverty"].dropna().between(0, 100).all()
    assert values["acs_poverty"].nunique() < 120  # rates vary between NTAs only


def test_dasymetric_by_raster_cells(grid: CityData, tmp_path: Path) -> None:
    rasterio = pytest.importorskip("rasterio")
    from affine import Affine
    from shapely import contains_xy

    west, south, east, north = grid.regions.geometry.total_bounds
    size = 60
    transform = Affine((east - west) / size, 0.0, west, 0.0, -(north - south) / size, north)
    cols, rows = np.meshgrid(np.arange(size), np.arange(size))
    xs, ys = rasterio.transform.xy(transform, rows.ravel(), cols.ravel())
    inside = contains_xy(grid.regions.geometry.iloc[0], np.asarray(xs), np.asarray(ys)).reshape(size, size)
    path = tmp_path / "pop.tif"
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=1, dtype="float32",
                       crs="EPSG:4326", transform=transform) as raster:
        raster.write(inside.astype("float32"), 1)
    weights = read_weights(str(path))
    got = interpolate(grid.regions, _sources(grid), ["people"], [], weights)
    ids = grid.region_ids
    assert got.values["people"][ids[0]] == pytest.approx(100) and got.values["people"][ids[1]] == 0
    assert any("hold no weight points" in note for note in got.notes)  # B's 90 people have nowhere to go


def test_own_city_built_then_attached(raw_city: dict[str, Path], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A city analyst's path: build a dataset from their files, attach their tract table and a keyed table."""
    from urbanprofile.data.build.pipeline import build_dataset
    from urbanprofile.data.build.spec import BuildSpec

    folder = tmp_path / "toy"
    build_dataset(BuildSpec(city="toy", regions=raw_city["regions"], pois=raw_city["pois"],
                            categories=["food", "shop", "school"], labels=raw_city["labels"]), folder)
    city = load_dataset(folder)
    tracts = gpd.GeoDataFrame({"tract": ["t1", "t2"], "jobs": [600.0, 300.0], "rent": [900.0, 1500.0]},
                              geometry=[box(0, 0, 0.03, 0.05), box(0.03, 0, 0.06, 0.05)],
                              crs="EPSG:4326").to_crs("EPSG:32631")
    tracts.to_file(tmp_path / "tracts.gpkg")
    points = tmp_path / "homes.csv"
    pd.DataFrame({"lon": [0.005, 0.015, 0.045], "lat": [0.005, 0.005, 0.025], "n": [1.0, 2.0, 1.0]}).to_csv(
        points, index=False)
    got = interpolate(city.regions, read_indicator_layer(tmp_path / "tracts.gpkg"), ["jobs"], ["rent"],
                      read_weights(f"{points}:n"), source_name="tracts.gpkg", id_column="tract")
    assert got.values["jobs"]["c00"] == pytest.approx(200) and got.values["jobs"]["c10"] == pytest.approx(400)
    assert got.values["jobs"]["c42"] == pytest.approx(300) and got.values["jobs"].sum() == pytest.approx(900)
    assert got.values["rent"]["c42"] == pytest.approx(1500) and np.isnan(got.values["rent"]["c01"])
    out = tmp_path / "sets"
    write_indicator_set(out, city.name, "tracts", got, {"source": "tracts.gpkg"})
    keyed = pd.DataFrame({"region_id": ["c00", "c11"], "score": [1.0, 2.0]})
    write_indicator_set(out, city.name, "scores",
                        attach_by_key(city.region_ids, keyed, "region_id", ["score"], "scores.csv", city.name), {})
    monkeypatch.setenv("URBANPROFILE_INDICATORS", str(out))
    again = load_dataset(folder)
    assert {"crime", "jobs", "rent", "score"} <= set(again.tasks)
    assert again.targets.loc["c11", "score"] == 2.0 and np.isnan(again.targets.loc["c22", "score"])
