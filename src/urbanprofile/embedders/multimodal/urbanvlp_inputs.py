"""Frozen-encoder inputs of UrbanVLP from a city's modality items (CityView captions, street view, tiles).

Reads ``city.modalities`` (see :mod:`urbanprofile.data.loaders.multimodal`): ``tile_caption`` (one row per
sentence), ``tile_image``, ``streetview_caption`` (``item``, ``lon``, ``lat``) and ``streetview_image``,
and runs them through the frozen encoders of :mod:`urbanprofile.encoders` (cached on disk):

- tile text: the mean of the tile's sentence vectors (MiniLM), re-normalised;
- tile and street-view locations: GeoCLIP (or the sinusoidal encoder about the city's mean centre);
- photos: EfficientNet-Lite0 pooled features; an unreadable file is skipped, counted and reported;
- street-view captions: MiniLM token vectors of the caption's first ``max_words`` words (the captions
  run to ~130 words; the cut bounds the CPU cost of encoding 14,000 of them on 2 shared cores and is
  reported), in one pass: their mean is the item's caption vector, and at most ``max_tokens`` evenly
  spaced tokens are kept for the token loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.data.loaders.multimodal import readable_images
from urbanprofile.encoders.image import EfficientNetImageEncoder
from urbanprofile.encoders.location import GeoCLIPLocationEncoder, SinusoidalLocationEncoder
from urbanprofile.encoders.text import MiniLMTextEncoder
from urbanprofile.errors import DataError, MethodUnavailableError


#: Street-view captions are encoded from their first this many words.
@dataclass
class VLPInputs:
    """Frozen-encoder outputs of one city, the only thing the UrbanVLP towers read.

    Attributes:
        region_ids: The regions (tiles), in order.
        tile_text: (N, Dt) sentence vector of each tile's caption (rows of tiles without one are ignored).
        has_tile_text: (N,) whether the tile has a caption.
        tile_location: (N, Dl) location encoding of each tile centre.
        tile_image: (N, Di) image features of each tile, or ``None`` when no tile has an image.
        has_tile_image: (N,) whether the tile has an image.
        item_region: (M,) index into ``region_ids`` of each street-view item.
        item_text: (M, Dt) sentence vector of each item's caption.
        has_item_text: (M,) whether the item has a caption.
        item_location: (M, Dl) location encoding of each item.
        item_image: (M, Di) photo features of each item, or ``None`` when no item has a photo.
        has_item_image: (M,) whether the item has a photo.
        item_tokens: (M, L, Dt) caption token vectors (zeros where masked), or ``None``.
        item_token_mask: (M, L) which token slots hold a token.
        notes: What was skipped or missing while building the inputs (counted, for the report).
    """

    region_ids: pd.Index
    tile_text: np.ndarray
    has_tile_text: np.ndarray
    tile_location: np.ndarray
    tile_image: np.ndarray | None = None
    has_tile_image: np.ndarray | None = None
    item_region: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    item_text: np.ndarray | None = None
    has_item_text: np.ndarray | None = None
    item_location: np.ndarray | None = None
    item_image: np.ndarray | None = None
    has_item_image: np.ndarray | None = None
    item_tokens: np.ndarray | None = None
    item_token_mask: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def n_regions(self) -> int:
        return len(self.region_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_region)

    def validate(self) -> VLPInputs:
        """Check shapes, masks and finiteness; fills absent masks. Raises :class:`DataError`."""
        n, m = self.n_regions, self.n_items

        def rows(name: str, array: np.ndarray | None, count: int, ndim: int = 2) -> None:
            if array is None:
                return
            if array.ndim != ndim or array.shape[0] != count:
                raise DataError(f"UrbanVLP inputs: {name} has shape {array.shape}, expected {count} rows")
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                bad = int(np.argmax(~np.isfinite(array).reshape(count, -1).all(axis=1)))
                raise DataError(f"UrbanVLP inputs: {name} row {bad} has NaN or infinite values")

        rows("tile_text", self.tile_text, n)
        rows("has_tile_text", self.has_tile_text, n, 1)
        rows("tile_location", self.tile_location, n)
        if self.tile_image is not None:
            rows("tile_image", self.tile_image, n)
            if self.has_tile_image is None:
                self.has_tile_image = np.ones(n, dtype=bool)
            rows("has_tile_image", self.has_tile_image, n, 1)
        rows("item_region", self.item_region, m, 1)
        if m:
            if self.item_location is None:
                raise DataError("UrbanVLP inputs: street-view items need item_location")
            if self.item_region.min() < 0 or self.item_region.max() >= n:
                raise DataError("UrbanVLP inputs: item_region points outside the regions")
            rows("item_location", self.item_location, m)
            if self.item_text is not None:
                rows("item_text", self.item_text, m)
                if self.has_item_text is None:
                    self.has_item_text = np.ones(m, dtype=bool)
            if self.item_image is not None:
                rows("item_image", self.item_image, m)
                if self.has_item_image is None:
                    self.has_item_image = np.ones(m, dtype=bool)
            content = np.zeros(m, dtype=bool)
            if self.has_item_text is not None:
                content |= self.has_item_text
            if self.has_item_image is not None:
                content |= self.has_item_image
            if not content.all():
                raise DataError(f"UrbanVLP inputs: street-view item {int(np.argmin(content))} has neither "
                                "a photo nor a caption; drop it (and count it) before building the inputs")
            if self.item_tokens is not None:
                if self.item_tokens.ndim != 3 or self.item_tokens.shape[0] != m:
                    raise DataError(f"UrbanVLP inputs: item_tokens has shape {self.item_tokens.shape}, "
                                    f"expected ({m}, L, D)")
                if self.item_token_mask is None or self.item_token_mask.shape != self.item_tokens.shape[:2]:
                    raise DataError("UrbanVLP inputs: item_token_mask must have shape (M, L) like item_tokens")
        if not self.has_tile_text.any():
            raise DataError("UrbanVLP inputs: no tile has a caption; the global loss needs tile text")
        return self

    @property
    def text_dim(self) -> int:
        return int(self.tile_text.shape[1])

    @property
    def location_dim(self) -> int:
        return int(self.tile_location.shape[1])

    @property
    def image_dim(self) -> int:
        for array in (self.tile_image, self.item_image):
            if array is not None:
                return int(array.shape[1])
        return 0


MAX_WORDS = 32
#: Texts per call of the token encoder (bounds the memory of full-length token arrays).
TOKEN_CHUNK = 512


def _normalize(x: np.ndarray) -> np.ndarray:
    return np.asarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), dtype=np.float32)


def _by_length(texts: list[str]) -> np.ndarray:
    """An order of ``texts`` from shortest to longest: batches of similar length pad less."""
    return np.argsort([len(t) for t in texts], kind="stable")


def encode_sentences(encoder: Any, texts: list[str], progress: bool = True) -> np.ndarray:
    """Sentence vectors in the order of ``texts``, encoded shortest first (cached per text)."""
    order = _by_length(texts)
    out = np.empty((len(texts), encoder.dim), dtype=np.float32)
    out[order] = encoder.encode([texts[k] for k in order], progress=progress)
    return out


def truncate_words(text: str, max_words: int | None) -> str:
    """The first ``max_words`` words of ``text`` (all of it when ``None``)."""
    if max_words is None:
        return text
    words = text.split()
    return " ".join(words[:max_words]) if len(words) > max_words else text


def evenly_spaced_tokens(tokens: np.ndarray, max_tokens: int) -> np.ndarray:
    """At most ``max_tokens`` rows of ``tokens``, evenly spaced from first to last."""
    if len(tokens) <= max_tokens:
        return tokens
    keep = np.unique(np.linspace(0, len(tokens) - 1, max_tokens).round().astype(int))
    return tokens[keep]


def make_location_encoder(kind: str, origin_latlon: tuple[float, float]) -> Any:
    """The frozen location encoder: ``geoclip`` or ``sinusoidal`` (about ``origin_latlon``)."""
    if kind == "geoclip":
        return GeoCLIPLocationEncoder()
    if kind == "sinusoidal":
        return SinusoidalLocationEncoder(origin=origin_latlon)
    raise ValueError(f"location_encoder must be 'geoclip' or 'sinusoidal', got {kind!r}")


def vlp_inputs_from_city(
    city: CityData,
    location_encoder: str = "geoclip",
    images: bool = True,
    max_tokens: int = 32,
    max_words: int | None = MAX_WORDS,
    tokens: bool = True,
    progress: bool = True,
) -> VLPInputs:
    """Encode a city's modality items into :class:`VLPInputs`.

    Args:
        city: A city with locations and a ``tile_caption`` modality (street view and images optional).
        location_encoder: ``geoclip`` or ``sinusoidal``.
        images: Use tile and street-view photos where they exist.
        max_tokens: Caption tokens kept per street-view item.
        max_words: Street-view captions are encoded from their first this many words (``None``: all).
        tokens: Whether to compute caption tokens (the token loss; not needed to embed).
        progress: Progress bars while encoding.

    Raises:
        MethodUnavailableError: If the city has no locations or no tile captions.
    """
    if "tile_caption" not in city.modalities:
        have = ", ".join(sorted(city.modalities)) or "none"
        raise MethodUnavailableError(f"urbanvlp needs tile captions, which {city.name!r} lacks (it has: {have})")
    lonlat = city.coordinates()
    ids = city.region_ids
    position = pd.Series(np.arange(len(ids)), index=ids)
    n = len(ids)
    notes: list[str] = []
    text_encoder = MiniLMTextEncoder()
    origin = (float(lonlat[:, 1].mean()), float(lonlat[:, 0].mean()))
    locator = make_location_encoder(location_encoder, origin)

    # Tile captions: the mean sentence vector of each tile.
    captions = city.modalities["tile_caption"]
    sentence = encode_sentences(text_encoder, captions["text"].astype(str).tolist(), progress=progress)
    rows = position.loc[captions["region_id"]].to_numpy()
    tile_text = np.zeros((n, sentence.shape[1]), dtype=np.float32)
    np.add.at(tile_text, rows, sentence)
    has_tile_text = np.bincount(rows, minlength=n) > 0
    tile_text[has_tile_text] = _normalize(tile_text[has_tile_text])
    if (~has_tile_text).any():
        notes.append(f"{int((~has_tile_text).sum())} of {n} tiles have no caption (left out of the global loss)")

    tile_location = locator.encode(lonlat[:, ::-1].copy(), progress=progress)

    tile_image = has_tile_image = None
    if images and "tile_image" in city.modalities and len(city.modalities["tile_image"]):
        features, region_rows = _encode_photos(city.modalities["tile_image"], position, "tile", notes, progress)
        if len(region_rows):
            tile_image = np.zeros((n, features.shape[1]), dtype=np.float32)
            tile_image[region_rows] = features
            has_tile_image = np.zeros(n, dtype=bool)
            has_tile_image[region_rows] = True

    inputs = VLPInputs(region_ids=ids, tile_text=tile_text, has_tile_text=has_tile_text,
                       tile_location=tile_location, tile_image=tile_image, has_tile_image=has_tile_image,
                       notes=notes)
    _add_streetview(inputs, city, position, text_encoder, locator, images, max_tokens, max_words, tokens,
                    progress)
    return inputs.validate()


def _encode_photos(
    table: pd.DataFrame, position: pd.Series, what: str, notes: list[str], progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Features of the readable photos of a table, and the row of each kept photo in ``table``."""
    paths = table["image"].astype(str).tolist()
    ok, bad = readable_images(paths)
    if bad:
        first = next(iter(bad.items()))
        notes.append(f"{len(bad)} {what} photo(s) skipped as unreadable (e.g. {first[0]}: {first[1]})")
    kept = np.flatnonzero(ok)
    if not len(kept):
        return np.zeros((0, 0), dtype=np.float32), kept
    features = EfficientNetImageEncoder().encode([paths[k] for k in kept], progress=progress)
    if what == "tile":
        return features, position.loc[table["region_id"].to_numpy()[kept]].to_numpy()
    return features, kept


def _add_streetview(
    inputs: VLPInputs,
    city: CityData,
    position: pd.Series,
    text_encoder: Any,
    locator: Any,
    images: bool,
    max_tokens: int,
    max_words: int | None,
    tokens: bool,
    progress: bool,
) -> None:
    """Street-view items: captions (with tokens) and photos, matched by item name."""
    captions = city.modalities.get("streetview_caption")
    photos = city.modalities.get("streetview_image") if images else None
    if captions is None or not len(captions):
        captions = pd.DataFrame(columns=["region_id", "text", "item", "lon", "lat"])
    items = captions[["region_id", "item", "lon", "lat"]].copy()
    items["text"] = captions["text"].astype(str).to_numpy()
    photo_features = None
    if photos is not None and len(photos):
        features, kept = _encode_photos(photos, position, "street-view", inputs.notes, progress)
        if len(kept):
            photo_table = photos.iloc[kept].reset_index(drop=True)
            photo_table["photo"] = np.arange(len(kept))
            items = items.merge(photo_table[["region_id", "item", "lon", "lat", "photo"]],
                                on=["region_id", "item"], how="outer", suffixes=("", "_photo"))
            items["lon"] = items["lon"].fillna(items.pop("lon_photo"))
            items["lat"] = items["lat"].fillna(items.pop("lat_photo"))
            photo_features = features
    if not len(items):
        return
    m = len(items)
    inputs.item_region = position.loc[items["region_id"].to_numpy()].to_numpy()
    latlon = items[["lat", "lon"]].to_numpy(dtype=float)
    inputs.item_location = locator.encode(latlon, progress=progress)
    has_text = items["text"].notna().to_numpy() if "text" in items else np.zeros(m, dtype=bool)
    texts = [truncate_words(str(t), max_words) for t in items["text"][has_text]]
    if max_words is not None and has_text.any():
        n_cut = sum(len(str(t).split()) > max_words for t in items["text"][has_text])
        inputs.notes.append(f"{n_cut} of {int(has_text.sum())} street-view captions encoded from their first "
                            f"{max_words} words")
    if has_text.any():
        # One pass: the token vectors, whose mean is the item's sentence vector (MiniLM's mean pooling
        # without the two special tokens); at most ``max_tokens`` of them are kept for the token loss.
        item_text = np.zeros((m, text_encoder.dim), dtype=np.float32)
        token_array = np.zeros((m, max_tokens, text_encoder.dim), dtype=np.float16)
        token_mask = np.zeros((m, max_tokens), dtype=bool)
        rows = np.flatnonzero(has_text)
        order = _by_length(texts)
        for start in range(0, len(rows), TOKEN_CHUNK):
            chunk = order[start:start + TOKEN_CHUNK]
            blocks = text_encoder.encode_tokens([texts[k] for k in chunk], progress=progress)
            for row, block in zip(rows[chunk], blocks, strict=True):
                item_text[row] = block.mean(axis=0)
                kept_tokens = evenly_spaced_tokens(block, max_tokens)
                token_array[row, :len(kept_tokens)] = kept_tokens
                token_mask[row, :len(kept_tokens)] = True
        item_text[has_text] = _normalize(item_text[has_text])
        inputs.item_text, inputs.has_item_text = item_text, has_text
        if tokens:
            inputs.item_tokens, inputs.item_token_mask = token_array, token_mask
    if photo_features is not None and "photo" in items:
        has_photo = items["photo"].notna().to_numpy()
        item_image = np.zeros((m, photo_features.shape[1]), dtype=np.float32)
        item_image[has_photo] = photo_features[items["photo"][has_photo].astype(int).to_numpy()]
        inputs.item_image, inputs.has_item_image = item_image, has_photo
