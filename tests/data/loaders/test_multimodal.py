"""Modality items of the datasets: captions, street view, tile images, Olinda cuts, Chicago geo-text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from urbanprofile.data.loaders.multimodal import readable_images, streetview_lonlat, tile_id
from urbanprofile.data.registry import list_datasets, load_dataset
from urbanprofile.errors import DataError


def _cityview_dir(root: Path) -> Path:
    """A tiny CityView layout with bad items: an unknown tile, an empty caption, an unlinked street view."""
    cv = root / "cityview"
    (cv / "labels").mkdir(parents=True)
    (cv / "labels" / "Testcity.csv").write_text(
        "satellite_img_name,BD09 coordinate,WGS84 coordinate,carbon_emissions (ton),population (unit),"
        "gdp (million yuan)\n"
        'Testcity/16_1_1_s.jpg,"(1,1)","(39.90, 116.40)",10,100,5\n'
        'Testcity/16_1_2_s.jpg,"(1,2)","(39.91, 116.41)",20,200,10000.0\n'
    )
    (cv / "captions").mkdir()
    captions = [[{"caption": "Dense housing blocks", "image": "Testcity/16_1_1_s.jpg"},
                 {"caption": "A river runs along it", "image": "Testcity/16_1_1_s.jpg"},
                 {"caption": "  ", "image": "Testcity/16_1_2_s.jpg"},
                 {"caption": "Farmland", "image": "Testcity/16_9_9_s.jpg"}],
                [{"caption": "An industrial park", "image": "Testcity/16_1_2_s.jpg"}]]
    (cv / "captions" / "Testcity_captions.json").write_text(json.dumps(captions))
    (cv / "streetview").mkdir()
    (cv / "streetview" / "satellite_streetview.json").write_text(json.dumps(
        {"Testcity/16_1_1_s.jpg": ["7_116.401,39.901_201901_10.5.jpg"], "Testcity/16_5_5_s.jpg": ["x.jpg"],
         "Othercity/16_1_1_s.jpg": ["8_1.0,2.0_2019_1.jpg"]}))
    lines = [{"image": "7_116.401,39.901_201901_10.5.jpg", "caption": "Shops and bikes."},
             {"image": "9_116.5,39.95_201901_1.jpg", "caption": "Not linked."}]
    (cv / "streetview" / "testcity_streetview_captions.jsonl").write_text("\n".join(map(json.dumps, lines)))
    (cv / "streetview" / "7_116.401,39.901_201901_10.5.jpg").write_bytes(b"broken jpeg")
    return root


def test_cityview_items_link_and_count_skips(tmp_path: Path) -> None:
    city = load_dataset("cityview-testcity", _cityview_dir(tmp_path))
    captions = city.modalities["tile_caption"]
    assert captions.groupby("region_id").size().to_dict() == {"16_1_1": 2, "16_1_2": 1}
    sv = city.modalities["streetview_caption"]
    assert sv[["region_id", "lon", "lat"]].values.tolist() == [["16_1_1", 116.401, 39.901]]
    skips = city.meta["modality_skips"]
    assert skips["tile_caption"] == {"empty caption": 1, "caption names a tile not in the labels": 1}
    assert skips["streetview_caption"] == {"image not linked to any tile": 1}
    assert any("skipped" in note for note in city.meta["notes"])
    ok, bad = readable_images(city.modalities["streetview_image"]["image"])
    assert not ok.any() and "not a readable image" in next(iter(bad.values()))
    sub = city.subset(["16_1_2"])
    assert set(sub.modalities["tile_caption"]["region_id"]) == {"16_1_2"}
    assert "streetview_caption" in sub.modalities and sub.modalities["streetview_caption"].empty


def test_modality_naming_unknown_region_is_an_error(tmp_path: Path) -> None:
    city = load_dataset("cityview-testcity", _cityview_dir(tmp_path))
    city.modalities["tile_caption"].loc[0, "region_id"] = "nope"
    with pytest.raises(DataError, match="modality 'tile_caption' names unknown region nope"):
        city.validate()


def test_names_parse() -> None:
    assert tile_id("Beijing/16_12659_4738_s.jpg") == "16_12659_4738"
    assert streetview_lonlat("10136_116.406929,39.756173_201901_173.08.jpg") == (116.406929, 39.756173)
    assert streetview_lonlat("garbage.jpg") is None


@pytest.mark.realdata
def test_raster_regions_folder_needs_one_polygon_file_and_one_raster(tmp_path: Path, data_dir: Path) -> None:
    folder = tmp_path / "scene"
    folder.mkdir()
    for part in ("shp", "shx", "dbf", "prj"):
        shutil.copy(data_dir / "olinda" / f"olinda1.{part}", folder / f"olinda1.{part}")
    assert "scene" not in list_datasets(tmp_path)  # no raster: not a dataset
    (folder / "scene.tif").write_bytes(b"not a tiff")
    city = load_dataset("scene", tmp_path)  # loads; the raster is only read when images are cut
    from urbanprofile.encoders.image import cut_region_images

    with pytest.raises(DataError, match="not a readable raster"):
        cut_region_images(city.regions, city.meta["raster"])


@pytest.mark.realdata
def test_real_multimodal_datasets(data_dir: Path) -> None:
    beijing = load_dataset("cityview-beijing", data_dir)
    assert beijing.modalities["tile_caption"]["region_id"].nunique() == beijing.n_regions
    assert len(beijing.modalities["streetview_caption"]) > 14_000
    assert len(beijing.modalities["tile_image"]) == 10 and len(beijing.modalities["streetview_image"]) == 3
    vlp = load_dataset("cityview-beijing-urbanvlp", data_dir)
    assert vlp.n_regions == 440 and {"nightlight", "houseprice"} <= set(vlp.tasks)
    assert vlp.views["poi_counts"].shape == (440, 14)
    assert np.isfinite(vlp.regions["urbanvlp_houseprice_predict"]).all()
    olinda = load_dataset("olinda", data_dir)
    assert olinda.n_regions == 470 and olinda.tasks == ["V014"] and olinda.has_locations
    chicago = load_dataset("hafusion-chicago", data_dir)
    assert len(chicago.modalities["geo_text"]) == 77
    assert "Centroid Coordinates" in chicago.modalities["geo_text"]["text"].iloc[0]
