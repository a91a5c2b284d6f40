"""One frozen-encoder vector per region and modality, with an explicit presence mask.

Modalities (what a region has decides which are present):

=============  ==========================================================================================
``location``   GeoCLIP (512-d) of the region centroid, beside the multi-scale sinusoidal features of
               ``raw-location`` (34-d, about the city's mean centre): GeoCLIP's finest random-Fourier scale
               varies over tens of kilometres, too coarse alone to tell apart 1 km tiles of one city
``text``       mean MiniLM vector (384-d) of the region's tile captions (``tile_caption``), or of its geo-text
               (``geo_text``, Chicago)
``streetview`` mean over the street-view photos inside the region of the MiniLM vector of the photo's caption,
               read from its first 32 words (mean of the word-piece vectors, L2-normalised; the captions
               run to ~150 words and encoding them whole costs ~5x more on CPU; the token vectors are
               cached and shared with UrbanVLP)
``image``      EfficientNet-Lite0 (1280-d) of the tile image (``tile_image``, mean if several) or of the image
               cut from the raster (``region_image``)
``poi``        log1p POI counts (``poi_counts`` view)
``landuse``    log1p land-use counts (``landuse_counts`` view)
``mobility``   log1p out- and in-flow trip profiles (``od_flows`` view)
=============  ==========================================================================================

A region without items for a modality is marked absent (``present`` False; its row is NaN, never a zero
vector standing in for data). Items that cannot be encoded (unreadable images, regions outside a raster)
are skipped and counted in :attr:`RegionModalities.skipped`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from urbanprofile.data.city import view_csr
from urbanprofile.data.loaders.multimodal import readable_images
from urbanprofile.encoders.image import EfficientNetImageEncoder, cut_region_images
from urbanprofile.encoders.location import GeoCLIPLocationEncoder, SinusoidalLocationEncoder
from urbanprofile.encoders.text import MiniLMTextEncoder
from urbanprofile.errors import MethodUnavailableError, unknown_name

if TYPE_CHECKING:
    from urbanprofile.data.city import CityData

MODALITIES = ("location", "text", "streetview", "image", "poi", "landuse", "mobility")
#: Street-view captions are read from their first this many words.
STREETVIEW_WORDS = 32
#: Modalities computed by pretrained encoders (the rest are the city's count views).
ENCODED = ("location", "text", "streetview", "image")


@dataclass
class RegionModalities:
    """Per-modality region matrices: ``values[m]`` is (N, d_m) float32 with NaN rows where ``present[m]`` is False."""

    region_ids: pd.Index
    values: dict[str, np.ndarray] = field(default_factory=dict)
    present: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.values)

    def summary(self) -> dict[str, Any]:
        return {m: {"dim": int(self.values[m].shape[1]), "regions": int(self.present[m].sum()),
                    "skipped": self.skipped.get(m, {})} for m in self.values}


def available_modalities(city: CityData) -> list[str]:
    """The modalities this city has data for (in :data:`MODALITIES` order)."""
    # A modality table with no rows (e.g. UrbanVLP's Beijing tiles, whose images are not public) is no modality:
    # counting it would make a default pretraining ask for a modality no region has.
    mods = {name: table for name, table in city.modalities.items() if len(table) > 0}
    have = {
        "location": city.has_locations,
        "text": "tile_caption" in mods or "geo_text" in mods,
        "streetview": "streetview_caption" in mods,
        "image": "tile_image" in mods or "region_image" in mods,
        "poi": "poi_counts" in city.views,
        "landuse": "landuse_counts" in city.views,
        "mobility": "od_flows" in city.views,
    }
    return [m for m in MODALITIES if have[m]]


def check_modalities(city: CityData, names: Sequence[str] | None) -> list[str]:
    """Validate requested modality names against what the city has (``None``: all available)."""
    have = available_modalities(city)
    if names is None:
        if not have:
            raise MethodUnavailableError(f"dataset {city.name!r} has no modality the encoders can read")
        return have
    for name in names:
        if name not in MODALITIES:
            raise unknown_name("modality", name, MODALITIES)
        if name not in have:
            raise MethodUnavailableError(
                f"dataset {city.name!r} has no {name!r} modality (it has: {', '.join(have) or 'none'})"
            )
    if not names:
        raise MethodUnavailableError("at least one modality is needed")
    return list(dict.fromkeys(names))


def first_words(text: str, n: int) -> str:
    """The first ``n`` words of ``text`` (the whole text when it is shorter)."""
    words = text.split()
    return " ".join(words[:n]) if len(words) > n else text


@functools.cache
def _encoder(kind: str) -> Any:
    if kind == "text":
        return MiniLMTextEncoder()
    if kind == "image":
        return EfficientNetImageEncoder()

    return GeoCLIPLocationEncoder()


def region_modalities(
    city: CityData, names: Sequence[str] | None = None, *, progress: bool = True
) -> RegionModalities:
    """Encode the requested modalities of every region (cached encoders; see the module docstring)."""
    chosen = check_modalities(city, names)
    out = RegionModalities(region_ids=city.region_ids)
    for name in chosen:
        values, present, skipped = _compute(city, name, progress)
        values = values.astype(np.float32)
        values[~present] = np.nan
        out.values[name], out.present[name] = values, present
        if skipped:
            out.skipped[name] = skipped
    return out


def _compute(city: CityData, name: str, progress: bool) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    n = city.n_regions
    if name == "location":
        latlon = city.regions[["lat", "lon"]].to_numpy(dtype=float)
        geoclip = _encoder("location").encode(latlon, progress=progress)
        return np.hstack([geoclip, SinusoidalLocationEncoder().encode(latlon)]), np.ones(n, bool), {}
    if name in ("poi", "landuse"):
        view = city.view(f"{name}_counts").to_numpy(dtype=float)
        return np.log1p(np.clip(view, 0, None)), np.ones(n, bool), {}
    if name == "mobility":
        od = view_csr(city.view("od_flows"))
        both = np.hstack([od.toarray(), od.T.toarray()])
        return np.log1p(np.clip(both, 0, None)), np.ones(n, bool), {}
    if name == "text":
        table = city.modalities.get("tile_caption")
        if table is None:
            table = city.modalities["geo_text"]
        return _mean_per_region(city, table, _encoder("text").encode(list(table["text"]), progress=progress), 384)
    if name == "streetview":
        table = city.modalities["streetview_caption"]
        texts = [first_words(str(t), STREETVIEW_WORDS) for t in table["text"]]
        blocks = _encoder("text").encode_tokens(texts, progress=progress)
        vectors = np.stack([b.mean(0) for b in blocks]) if blocks else np.zeros((0, 384), np.float32)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return _mean_per_region(city, table, vectors, 384)
    if name == "image":
        return _images(city, progress)
    raise unknown_name("modality", name, MODALITIES)


def _mean_per_region(
    city: CityData, table: pd.DataFrame, vectors: np.ndarray, dim: int, skipped: dict[str, int] | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    rows = city.region_ids.get_indexer(pd.Index(table["region_id"]))
    values = np.zeros((city.n_regions, dim), dtype=np.float64)
    counts = np.zeros(city.n_regions)
    np.add.at(values, rows, vectors)
    np.add.at(counts, rows, 1.0)
    present = counts > 0
    values[present] /= counts[present, None]
    return values, present, dict(skipped or {})


def _images(city: CityData, progress: bool) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    encoder = _encoder("image")
    if "region_image" in city.modalities:
        raster = str(city.modalities["region_image"]["raster"].iloc[0])
        cut = cut_region_images(city.regions, raster)
        table = pd.DataFrame({"region_id": cut.ids})
        vectors = encoder.encode(cut.images, progress=progress) if cut.images else np.zeros((0, 1280), np.float32)
        skipped: dict[str, int] = {}
        for reason in cut.skipped.values():
            skipped[reason] = skipped.get(reason, 0) + 1
        return _mean_per_region(city, table, vectors, 1280, skipped)
    table = city.modalities["tile_image"]
    ok, bad = readable_images(table["image"])
    good = table[ok]
    vectors = encoder.encode(list(good["image"]), progress=progress) if len(good) else np.zeros((0, 1280), np.float32)
    skipped = {"unreadable image file": len(bad)} if bad else {}
    return _mean_per_region(city, good, vectors, 1280, skipped)
