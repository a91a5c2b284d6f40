"""Maps of a built city: PNG and HTML choropleths of views, labels and model layers, escaped HTML."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import pytest
from helpers import assert_user_error
from helpers import run_cli_process as run_cli

from urbanprofile.data import load_dataset
from urbanprofile.data.build.pipeline import build_dataset
from urbanprofile.data.build.spec import BuildSpec
from urbanprofile.errors import UnknownNameError, UrbanProfileError
from urbanprofile.report.maps import layer_values, map_city, render_html

EVIL = '<script>alert("x")</script>'


@pytest.fixture
def built(raw_city: dict[str, Path], tmp_path: Path) -> Path:
    regions = gpd.read_file(raw_city["regions"])
    regions.loc[0, "name"] = EVIL
    regions.loc[1, "region_id"] = 'c"&<b>'
    evil = tmp_path / "evil.gpkg"
    regions.to_file(evil)
    out = tmp_path / "built" / "toy"
    build_dataset(BuildSpec("toy", regions=evil, region_name_column="name", pois=raw_city["pois"],
                            labels=raw_city["labels"]), out)
    return out


def test_png_and_html_written(built: Path, tmp_path: Path) -> None:
    city = load_dataset(built)
    png, page = map_city(city, "view:poi_counts:food", [tmp_path / "m" / "food.png", tmp_path / "m" / "food.html"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < png.stat().st_size < 300_000
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.count("data-region=") == city.n_regions
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched
    assert not list((tmp_path / "m").glob(".*"))


def test_html_escapes_region_names_and_ids(built: Path) -> None:
    city = load_dataset(built)
    page = render_html(city, layer_values(city, "label:crime"))
    assert EVIL not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert 'data-region="c&quot;&amp;&lt;b&gt;"' in page
    assert page.count("<script>") == 1  # only the page's own


def test_layers(built: Path) -> None:
    city = load_dataset(built)
    assert layer_values(city, "view:poi_counts").values.sum() == city.views["poi_counts"].to_numpy().sum()
    residual = layer_values(city, "residual:crime", method="raw-poi", protocol="nested")
    assert residual.diverging and residual.values.notna().sum() == 29  # the renamed region has no label
    bias = layer_values(city, "bias:crime", method="raw-poi", protocol="spatial")
    assert 1 <= bias.values.nunique() <= 5  # one R^2 per spatial block
    with pytest.raises(UrbanProfileError, match="must be view"):
        layer_values(city, "colour:crime")
    with pytest.raises(UnknownNameError, match="did you mean 'food'"):
        layer_values(city, "view:poi_counts:fod")
    with pytest.raises(UnknownNameError, match="crime"):
        layer_values(city, "label:crimes")


def test_cli_map(built: Path, tmp_path: Path) -> None:
    out = tmp_path / "maps" / "bias.png"
    html = str(out.with_suffix(".html"))
    ok = run_cli("map", str(built), "--layer", "prediction:crime", "--out", str(out), "--out", html, "--parents")
    assert ok.returncode == 0, ok.stderr
    assert out.is_file() and out.with_suffix(".html").is_file()
    bad = tmp_path / "maps" / "x.jpg"
    assert_user_error(run_cli("map", str(built), "--layer", "label:crime", "--out", str(bad)), ".png or .html")
    assert_user_error(run_cli("map", str(tmp_path / "nowhere"), "--layer", "label:crime", "--out", str(out)),
                      "not a built dataset folder")
    assert not bad.exists()
