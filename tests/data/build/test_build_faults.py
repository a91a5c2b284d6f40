"""Faults in building a dataset: nothing of the user's deleted, nothing silently wrong, one `error:` line each.

Every case writes a tiny seeded city to ``tmp_path``: a 3 x 2 grid of 0.01-degree regions at lon 10.00-10.03,
lat 50.00-50.02 (so lon/lat swapped lands far away), POIs, trips and labels. The CLI runs in-process.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import assert_one_error, run_cli

from urbanprofile.data import load_dataset
from urbanprofile.data.build.pipeline import build_city, build_dataset
from urbanprofile.data.build.regions import h3_cell_estimate, read_boundary
from urbanprofile.data.build.spec import BuildSpec
from urbanprofile.errors import DataError

LON0, LAT0, STEP = 10.0, 50.0, 0.01


def _grid(ids: list[str] | None = None) -> tuple[list[str], list[object]]:
    from shapely.geometry import box

    cells = [box(LON0 + i * STEP, LAT0 + j * STEP, LON0 + (i + 1) * STEP, LAT0 + (j + 1) * STEP)
             for i in range(3) for j in range(2)]
    return ids or [f"r{k}" for k in range(6)], cells


def write_city(folder: Path, ids: list[str] | None = None, n_pois: int = 40, seed: int = 0) -> dict[str, Path]:
    """Regions (GeoPackage, text ids), POIs, trips by id and labels by id, all inside the grid."""
    import geopandas as gpd

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    region_ids, cells = _grid(ids)
    gpd.GeoDataFrame({"region_id": region_ids}, geometry=cells, crs="EPSG:4326").to_file(folder / "regions.gpkg")
    pd.DataFrame({"lon": LON0 + rng.uniform(0.0005, 0.0295, n_pois), "lat": LAT0 + rng.uniform(0.0005, 0.0195, n_pois),
                  "category": rng.choice(["food", "shop"], n_pois)}).to_csv(folder / "pois.csv", index=False)
    pd.DataFrame({"origin": region_ids[:4], "destination": region_ids[1:5]}).to_csv(folder / "trips.csv", index=False)
    pd.DataFrame({"region_id": region_ids, "crime": np.arange(6, dtype=float) + 1}).to_csv(folder / "labels.csv",
                                                                                        index=False)
    return {name: folder / file for name, file in [("regions", "regions.gpkg"), ("pois", "pois.csv"),
                                                   ("trips", "trips.csv"), ("labels", "labels.csv")]}


@pytest.fixture
def city_files(tmp_path: Path) -> dict[str, Path]:
    return write_city(tmp_path / "raw")


def spec(files: dict[str, Path], **overrides: object) -> BuildSpec:
    settings: dict[str, object] = {"city": "toy", "regions": files["regions"], "pois": files["pois"]}
    settings.update(overrides)
    return BuildSpec(**settings)  # type: ignore[arg-type]


def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    return run_cli(monkeypatch, capsys, *args)




def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 1. --overwrite replaces only a built dataset, atomically ------------------------------------------
def test_overwrite_refuses_a_folder_that_is_not_a_dataset(city_files: dict[str, Path], monkeypatch, capsys) -> None:
    victim = city_files["regions"].parent
    (victim / "thesis.docx").write_bytes(b"four years")
    (victim / "sub").mkdir()
    (victim / "sub" / "notes.txt").write_text("keep me")
    before = tree(victim)
    code, _, err = cli(monkeypatch, capsys, "build", "v", "--regions", str(city_files["regions"]), "--labels",
                       str(city_files["labels"]), "-o", str(victim), "--overwrite")
    assert_one_error(code, err, str(victim), "not a built dataset")
    assert tree(victim) == before


def test_overwrite_refuses_foreign_files_and_inputs_inside(city_files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    build_dataset(spec(city_files), out)
    (out / "thesis.docx").write_bytes(b"x")
    with pytest.raises(DataError, match=r"out: holds files that are not part of the dataset \(thesis.docx\)"):
        build_dataset(spec(city_files), out, overwrite=True)
    assert (out / "thesis.docx").exists() and (out / "manifest.json").exists()
    (out / "thesis.docx").unlink()
    # The dataset's own regions as an input of its rebuild would be deleted by it.
    with pytest.raises(DataError, match=r"regions\.parquet: an input lies inside the output folder"):
        build_dataset(spec(city_files, regions=out / "regions.parquet", pois=None), out, overwrite=True)


def test_overwrite_swaps_atomically_and_a_failed_rebuild_keeps_the_old(city_files: dict[str, Path], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import urbanprofile.data.loaders.built as built

    out = tmp_path / "out"
    build_dataset(spec(city_files, labels=city_files["labels"]), out)
    old = tree(out)
    bad = tmp_path / "bad.csv"
    bad.write_text("region_id,crime\nr0,1\nr1,12,5\n")
    with pytest.raises(DataError):
        build_dataset(spec(city_files, labels=bad), out, overwrite=True)
    assert tree(out) == old

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(built, "_write_files", full_disk)
    with pytest.raises(DataError, match="out: cannot write the dataset \\(No space left on device\\)"):
        build_dataset(spec(city_files, labels=city_files["labels"]), out, overwrite=True)
    assert tree(out) == old and sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "out", "raw"]
    monkeypatch.undo()

    new_labels = tmp_path / "new.csv"
    pd.DataFrame({"region_id": [f"r{k}" for k in range(6)], "crime": np.arange(6.0) * 10}).to_csv(new_labels,
                                                                                                 index=False)
    build_dataset(spec(city_files, labels=new_labels), out, overwrite=True)
    assert load_dataset(out).targets["crime"].tolist() == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "new.csv", "out", "raw"]


@pytest.mark.skipif(os.name != "posix", reason="needs POSIX file permissions")
def test_read_only_output_location(city_files: dict[str, Path], tmp_path: Path, monkeypatch, capsys) -> None:
    import tempfile

    import urbanprofile.data.io as io

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the folder refuse as it would refuse anyone else
        mkdtemp = tempfile.mkdtemp

        def refuse(*args: object, dir: str | None = None, **kwargs: object) -> str:
            if dir is not None and Path(dir) == locked:
                raise PermissionError(13, "Permission denied", dir)
            return mkdtemp(*args, dir=dir, **kwargs)  # type: ignore[call-overload]

        monkeypatch.setattr(io.tempfile, "mkdtemp", refuse)  # the dataset's building folder is made there
    try:
        code, _, err = cli(monkeypatch, capsys, "build", "toy", "--regions", str(city_files["regions"]), "--pois",
                           str(city_files["pois"]), "-o", str(locked / "toy"))
    finally:
        locked.chmod(0o755)
    assert_one_error(code, err, str(locked / "toy"), "cannot write the dataset", "Permission denied")
    assert list(locked.iterdir()) == []


# -- 3. trips with a count column --------------------------------------------------------------------------
def test_trip_count_column_is_summed(city_files: dict[str, Path], tmp_path: Path, monkeypatch, capsys) -> None:
    trips = tmp_path / "od.csv"
    trips.write_text("origin,destination,trips\nr0,r1,120000\nr1,r2,180000\nr0,r1,0\n")
    built = build_city(spec(city_files, trips=trips))
    od = built.city.views["od_flows"]
    assert int(od.to_numpy().sum()) == 300000 and od.loc["r0", "r1"] == 120000 and od.loc["r1", "r2"] == 180000
    assert built.report.trip_weight_column == "trips" and built.report.n_trips_kept == 3

    # A name that is not recognised is given with --trip-weight; without it each row is one trip.
    trips.write_text("origin,destination,people\nr0,r1,7\nr1,r2,5\n")
    assert int(build_city(spec(city_files, trips=trips)).city.views["od_flows"].to_numpy().sum()) == 2
    code, out, err = cli(monkeypatch, capsys, "build", "toy", "--regions", str(city_files["regions"]), "--trips",
                         str(trips), "--trip-weight", "people", "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert "trips kept / read (by people)" in out and "12 / 12" in out
    assert int(load_dataset(tmp_path / "out").views["od_flows"].to_numpy().sum()) == 12


@pytest.mark.parametrize(("rows", "fragments"), [
    ("r0,r1,3\nr1,r2,-5\n", ("od.csv line 3", "'trips' is -5", ">= 0")),
    ("r0,r1,3\nr1,r2,many\n", ("od.csv line 3", "'many' is not a number")),
])
def test_trip_counts_that_are_wrong_name_the_line(city_files: dict[str, Path], tmp_path: Path, rows: str,
                                                  fragments: tuple[str, ...]) -> None:
    trips = tmp_path / "od.csv"
    trips.write_text("origin,destination,trips\n" + rows)
    with pytest.raises(DataError) as caught:
        build_city(spec(city_files, trips=trips))
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_two_count_columns_ask_which(city_files: dict[str, Path], tmp_path: Path) -> None:
    trips = tmp_path / "od.csv"
    trips.write_text("origin,destination,count,weight\nr0,r1,3,0.5\n")
    with pytest.raises(DataError, match=r"'count', 'weight' could each be the number of trips.*--trip-weight"):
        build_city(spec(city_files, trips=trips))
    od = build_city(spec(city_files, trips=trips, trip_weight_column="weight")).city.views["od_flows"]
    assert od.loc["r0", "r1"] == 0.5
    od = build_city(spec(city_files, trips=trips, trip_weight_column="none")).city.views["od_flows"]
    assert od.loc["r0", "r1"] == 1 and od.to_numpy().sum() == 1


def test_trips_all_to_unknown_regions(city_files: dict[str, Path], tmp_path: Path) -> None:
    trips = tmp_path / "od.csv"
    trips.write_text("origin,destination\nx1,x2\nx3,x4\n")
    with pytest.raises(DataError, match=r"od.csv: none of the 2 trips has both ends in a region \(ids 'x1', 'x3'"):
        build_city(spec(city_files, trips=trips))


# -- 4. labels that are not numbers -------------------------------------------------------------------------
def test_label_na_tokens_are_counted_and_reported(city_files: dict[str, Path], tmp_path: Path, monkeypatch,
                                                  capsys) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("region_id,crime,district\nr0,1,north\nr1,n/a,north\nr2,3,south\nr3,,south\nr4,NA,x\n"
                      "r5,6,x\n")
    built = build_city(spec(city_files, labels=labels))
    assert built.city.tasks == ["crime"]  # the text column is no label, and says so
    assert built.city.targets["crime"].isna().tolist() == [False, True, False, True, True, False]
    assert built.report.label_values_missing == {"crime": 3}
    code, _, err = cli(monkeypatch, capsys, "build", "toy", "--regions", str(city_files["regions"]), "--labels",
                       str(labels), "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert "warning: 3 values of label 'crime' are missing" in err
    assert "warning: columns without numbers are not labels (name them with --label-columns to use them): " \
           "district" in err


@pytest.mark.parametrize("label_columns", [None, ["crime"]])
def test_label_decimal_comma_is_an_error_naming_line_and_value(city_files: dict[str, Path], tmp_path: Path,
                                                               label_columns: list[str] | None) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text('region_id,crime\nr0,1\nr1,"12,5"\nr2,3\n')
    with pytest.raises(DataError, match=r"labels.csv line 3: label 'crime': '12,5' is not a number \(a decimal "
                                        r"comma"):
        build_city(spec(city_files, labels=labels, label_columns=label_columns))


def test_label_column_without_values_is_an_error(city_files: dict[str, Path], tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("region_id,crime,empty\nr0,1,\nr1,2,n/a\n")
    report = build_city(spec(city_files, labels=labels)).report  # found by looking: not a label, and said so
    assert report.label_columns_skipped == ["empty (empty)"]
    with pytest.raises(DataError, match=r"labels.csv: label column 'empty' has no value \(all 2 are missing\)"):
        build_city(spec(city_files, labels=labels, label_columns=["crime", "empty"]))
    labels.write_text("region_id,crime\nr0,\nzz,2\n")  # its only value belongs to no region
    with pytest.raises(DataError, match="label 'crime' has no value for any region"):
        build_city(spec(city_files, labels=labels))


# -- 5. POIs that miss the regions ----------------------------------------------------------------------------
def test_swapped_lat_lon_is_detected(city_files: dict[str, Path], monkeypatch, capsys) -> None:
    pois = pd.read_csv(city_files["pois"])
    pois.rename(columns={"lon": "lat", "lat": "lon"}).to_csv(city_files["pois"], index=False)
    code, _, err = cli(monkeypatch, capsys, "build", "toy", "--regions", str(city_files["regions"]), "--pois",
                       str(city_files["pois"]), "-o", str(city_files["pois"].parent / "out"))
    assert_one_error(code, err, "pois.csv", "0 of 40 POIs lie inside a region, 40 would with longitude and latitude "
                     "swapped", "--lon-column lat --lat-column lon")
    assert not (city_files["pois"].parent / "out").exists()


def test_pois_all_outside_are_an_error(city_files: dict[str, Path]) -> None:
    pois = pd.read_csv(city_files["pois"])
    pois.assign(lon=pois["lon"] + 5).to_csv(city_files["pois"], index=False)
    with pytest.raises(DataError, match=r"pois.csv: none of the 40 POIs lies inside a region \(POIs span lon 15"):
        build_city(spec(city_files))


def test_unreadable_coordinates_and_malformed_rows_are_counted(city_files: dict[str, Path]) -> None:
    lines = city_files["pois"].read_text().splitlines()
    lines[3] = "10.01,fifty,food"  # a coordinate that is not a number: line 4
    lines[5] = "10.01,50.01"  # a row with a field missing: a parse error, not a POI without a location
    lines[7] = ",,shop"  # no location
    city_files["pois"].write_text("\n".join(lines) + "\n")
    report = build_city(spec(city_files)).report
    assert (report.n_pois_unreadable, report.n_pois_malformed, report.n_pois_missing_location) == (1, 1, 1)
    assert report.n_pois_read == 40 and report.n_pois_joined == 37
    warnings = "\n".join(report.warnings())
    assert "1 POIs with coordinates that are not numbers dropped (first: " in warnings
    assert "pois.csv line 4 lat='fifty'" in warnings
    assert "1 POI rows with the wrong number of fields (parse errors) dropped" in warnings
    # Nothing readable at all is an error, not an empty view.
    city_files["pois"].write_text("lon,lat,category\nten,fifty,food\n")
    with pytest.raises(DataError, match=r"pois\.csv: no POIs with a location"):
        build_city(spec(city_files))


# -- 6. region ids and overlapping regions ------------------------------------------------------------------
def test_null_region_id_is_an_error(tmp_path: Path) -> None:
    import geopandas as gpd

    _, cells = _grid()
    path = tmp_path / "regions.gpkg"
    gpd.GeoDataFrame({"region_id": ["a", None, "c", "d", "e", "f"]}, geometry=cells, crs="EPSG:4326").to_file(path)
    with pytest.raises(DataError, match=r"regions.gpkg: 1 regions have no id in field 'region_id' \(first: feature 2"):
        build_city(BuildSpec("toy", regions=path))


def test_overlapping_regions(city_files: dict[str, Path], tmp_path: Path) -> None:
    import geopandas as gpd
    from shapely.geometry import box

    ids, cells = _grid()
    path = tmp_path / "overlap.gpkg"
    # A duplicate of r0: every POI in it would be counted in r0 and none in the copy.
    gpd.GeoDataFrame({"region_id": [*ids, "copy"]}, geometry=[*cells, cells[0]], crs="EPSG:4326").to_file(path)
    with pytest.raises(DataError, match=r"overlap.gpkg: regions 'r0' and 'copy' share 100% of the smaller one"):
        build_city(spec(city_files, regions=path))
    # A sliver overlap is counted and reported, not an error.
    sliver = box(LON0 + 0.03 - 0.001, LAT0, LON0 + 0.04, LAT0 + 0.01)
    gpd.GeoDataFrame({"region_id": [*ids, "east"]}, geometry=[*cells, sliver], crs="EPSG:4326").to_file(path)
    report = build_city(spec(city_files, regions=path)).report
    assert report.n_region_overlaps == 1
    assert any("1 pairs of regions overlap (regions 'r4' and 'east' share 10%" in w for w in report.warnings())


def test_ids_with_leading_zeros_stay_codes(tmp_path: Path) -> None:
    codes = ["01000", "01001", "02000", "02001", "03000", "03001"]
    files = write_city(tmp_path / "raw", ids=codes)
    built = build_city(spec(files, labels=files["labels"], trips=files["trips"]))
    assert list(built.city.region_ids) == codes
    assert built.city.targets["crime"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert built.city.views["od_flows"].loc["01000", "01001"] == 1 and built.report.n_trips_kept == 4


# -- 7. inputs that used to end in a traceback ------------------------------------------------------------------
def test_projected_file_labelled_wgs84(city_files: dict[str, Path], tmp_path: Path, monkeypatch, capsys) -> None:
    import geopandas as gpd

    utm = gpd.read_file(city_files["regions"]).to_crs("EPSG:32632")
    path = tmp_path / "mislabelled.gpkg"
    utm.set_crs("EPSG:4326", allow_override=True).to_file(path)
    code, _, err = cli(monkeypatch, capsys, "build", "toy", "--regions", str(path), "-o", str(tmp_path / "out"))
    assert_one_error(code, err, "mislabelled.gpkg", "are not lon/lat degrees", "CRS is wrong")


def test_unknown_crs_on_a_vector_file(city_files: dict[str, Path], tmp_path: Path, monkeypatch, capsys) -> None:
    import geopandas as gpd

    shp = tmp_path / "cells.shp"
    gpd.read_file(city_files["regions"]).to_file(shp)
    shp.with_suffix(".prj").unlink()
    code, _, err = cli(monkeypatch, capsys, "build", "toy", "--regions", str(shp), "--crs", "EPSG:999999", "-o",
                       str(tmp_path / "out"))
    assert_one_error(code, err, "cells.shp", "EPSG:999999", "not a CRS pyproj knows")


def test_csv_given_as_regions(city_files: dict[str, Path], tmp_path: Path, monkeypatch, capsys) -> None:
    code, _, err = cli(monkeypatch, capsys, "build", "toy", "--regions", str(city_files["labels"]), "-o",
                       str(tmp_path / "out"))
    assert_one_error(code, err, "labels.csv", "a plain table, not a vector file")


# -- 8. H3 size estimate and --max-cells -------------------------------------------------------------------------
def test_h3_estimate_and_max_cells(city_files: dict[str, Path], tmp_path: Path, monkeypatch, capsys) -> None:
    bbox = "10,50,10.05,50.04"
    estimate = h3_cell_estimate(read_boundary(bbox), 9)
    built = build_city(BuildSpec("toy", boundary=bbox, h3_resolution=9))
    assert 0.7 * built.city.n_regions <= estimate <= 1.4 * built.city.n_regions
    code, _, err = cli(monkeypatch, capsys, "build", "toy", "--boundary", bbox, "--h3-res", "9", "-o",
                       str(tmp_path / "ok"))
    assert code == 0, err
    assert f"about {estimate:,} cells" in err
    code, _, err = cli(monkeypatch, capsys, "build", "toy", "--boundary", "5,45,15,55", "--h3-res", "12", "-o",
                       str(tmp_path / "huge"))
    line = assert_one_error(code, err, "5,45,15,55", "H3 cells at resolution 12, more than --max-cells 200,000",
                            "raise --max-cells")
    assert int(line.split("about ")[1].split(" ")[0].replace(",", "")) > 10**9
    assert not (tmp_path / "huge").exists()


def test_landuse_that_misses_every_region(city_files: dict[str, Path], tmp_path: Path) -> None:
    import geopandas as gpd
    from shapely.geometry import box

    path = tmp_path / "landuse.geojson"
    gpd.GeoDataFrame({"class": ["park"]}, geometry=[box(20, 20, 20.1, 20.1)], crs="EPSG:4326").to_file(path)
    with pytest.raises(DataError, match=r"landuse.geojson: no land-use polygon overlaps a region \(they span lon 20"):
        build_city(spec(city_files, landuse=path))


def test_label_from_the_regions_file_names_file_and_region(tmp_path: Path) -> None:
    import geopandas as gpd

    ids, cells = _grid()
    path = tmp_path / "sectors.gpkg"
    gpd.GeoDataFrame({"region_id": ids, "income": ["10", "12,5", "n/a", "7", "8", "9"]}, geometry=cells,
                     crs="EPSG:4326").to_file(path)
    with pytest.raises(DataError, match=r"sectors.gpkg, region 'r1': label 'income': '12,5' is not a number"):
        build_city(BuildSpec("toy", regions=path, label_columns=["income"]))


def test_trip_coordinates_swapped(city_files: dict[str, Path], tmp_path: Path) -> None:
    trips = tmp_path / "trips.csv"
    pd.DataFrame({"o_lon": [50.005, 50.015], "o_lat": [10.005, 10.015], "d_lon": [50.015, 50.005],
                  "d_lat": [10.025, 10.005]}).to_csv(trips, index=False)
    with pytest.raises(DataError, match=r"trips.csv: 0 of 2 trip origins lie inside a region, 2 would with longitude "
                                        r"and latitude swapped.*--trip-columns"):
        build_city(spec(city_files, trips=trips))


def test_trip_counts_fill_the_time_patterns(city_files: dict[str, Path], tmp_path: Path) -> None:
    trips = tmp_path / "od.csv"
    trips.write_text("origin,destination,trips,time\nr0,r1,5,2024-03-01 08:00\nr1,r2,7,2024-03-01 20:00\n"
                     "r0,r1,2,2024-03-02 21:00\n")
    city = build_city(spec(city_files, trips=trips)).city
    patterns = city.od_patterns()
    assert patterns.sum(axis=0).tolist() == city.views["od_flows"].to_numpy().tolist()
    r0, r1 = 0, 1
    assert patterns[1, r0, r1] == 5 and patterns[3, r0, r1] == 2 and int(patterns.sum()) == 14


def test_build_refuses_a_missing_parent_unless_parents(city_files: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nowhere" / "built" / "toy"
    args = ("build", "toy", "--regions", str(city_files["regions"]), "--pois", str(city_files["pois"]),
            "--out", str(out))
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 2 and err.count("\n") == 1 and "--parents" in err and str(out.parent) in err
    assert not (tmp_path / "nowhere").exists()
    code, _, err = cli(monkeypatch, capsys, *args, "--parents")
    assert code == 0, err
    assert (out / "manifest.json").is_file()
