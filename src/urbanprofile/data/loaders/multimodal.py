"""Modality items for the pretrained encoders: captions, images, geo-text, linked to regions.

Everything here is discovered from the data directory's layout, not listed: for a CityView city ``<City>``
(from ``cityview/labels/<City>.csv``)

- ``cityview/captions/<City>_captions.json``: tile captions, ``[[{"caption", "image"}, ...]]`` (or a flat
  list), ``image`` = ``<City>/<tile>_s.jpg`` -> modality ``tile_caption`` (one row per sentence);
- ``cityview/tiles/<City>/*.jpg``: tile images -> ``tile_image``;
- ``cityview/streetview/satellite_streetview.json``: ``"<City>/<tile>_s.jpg" -> [street-view image names]``,
  whose names hold ``<id>_<lon>,<lat>_<yyyymm>_<heading>.jpg``; with ``<city>_streetview_captions.jsonl``
  (``{"image", "caption"}`` per line) -> ``streetview_caption``, and the street-view jpgs present beside them
  -> ``streetview_image``.

Bad items never stop a load and never become blank data: captions naming unknown tiles, empty captions,
street-view items without a tile or with unparsable names are dropped and counted, and the counts are
written to ``meta["modality_skips"]`` and ``meta["notes"]``. Image files are only checked when encoded
(:func:`readable_images`), so a corrupt jpg is skipped and reported there.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from urbanprofile.data.io import first_line, load_json
from urbanprofile.errors import DataError, MethodUnavailableError

#: The modalities a loader may attach (see ``CityData.modalities``).
TEXT_MODALITIES = ("tile_caption", "streetview_caption", "geo_text")
IMAGE_MODALITIES = ("tile_image", "streetview_image", "region_image")
_SV_NAME = re.compile(r"^[^_]*_([-+0-9.eE]+),([-+0-9.eE]+)_")


def modality_table(city: Any, name: str) -> pd.DataFrame:
    """A modality's item table, or a one-line error naming the modalities the city has."""
    if name not in city.modalities:
        have = ", ".join(sorted(city.modalities)) or "none"
        raise MethodUnavailableError(f"dataset {city.name!r} has no {name!r} items (it has: {have})")
    table: pd.DataFrame = city.modalities[name]
    return table


def tile_id(image_name: str) -> str:
    """``Beijing/16_12659_4738_s.jpg`` -> ``16_12659_4738``."""
    stem = Path(image_name).stem
    return stem[:-2] if stem.endswith("_s") else stem


def streetview_lonlat(name: str) -> tuple[float, float] | None:
    """``10136_116.406929,39.756173_201901_173.08.jpg`` -> ``(116.406929, 39.756173)``; ``None`` if unparsable."""
    match = _SV_NAME.match(Path(name).name)
    if match is None:
        return None
    lon, lat = float(match.group(1)), float(match.group(2))
    if not (-180 <= lon <= 180 and -90 <= lat <= 90):
        return None
    return lon, lat


class SkipLog:
    """Counts of dropped items per modality and reason (reported in the dataset's notes)."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter[str]] = {}

    def add(self, modality: str, reason: str, n: int = 1) -> None:
        if n:
            self.counts.setdefault(modality, Counter())[reason] += n

    def to_meta(self, meta: dict[str, Any]) -> None:
        meta["modality_skips"] = {m: dict(c) for m, c in self.counts.items()}
        notes = meta.setdefault("notes", [])
        for modality, counter in self.counts.items():
            for reason, n in counter.items():
                notes.append(f"{modality}: {n} item(s) skipped ({reason})")


def cityview_modalities(root: Path, city: str, ids: pd.Index, skips: SkipLog) -> dict[str, pd.DataFrame]:
    """The caption, tile-image and street-view items of a CityView city, linked to its tile ids.

    Args:
        root: The ``cityview/`` folder.
        city: The city's name as in ``labels/<City>.csv`` (matched case-insensitively).
        ids: The dataset's tile ids.
        skips: Where dropped items are counted.
    """
    known = set(ids)
    out: dict[str, pd.DataFrame] = {}
    captions = _find(root / "captions", f"{city}_captions.json")
    if captions is not None:
        out["tile_caption"] = _tile_captions(captions, known, skips)
    tiles = _find(root / "tiles", city)
    if tiles is not None and tiles.is_dir():
        rows = []
        for path in sorted(p for p in tiles.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
            tid = tile_id(path.name)
            if tid in known:
                rows.append((tid, str(path)))
            else:
                skips.add("tile_image", "file names a tile not in the labels")
        if rows:
            out["tile_image"] = pd.DataFrame(rows, columns=["region_id", "image"])
    street = root / "streetview"
    mapping_file = street / "satellite_streetview.json"
    if mapping_file.is_file():
        link = _streetview_links(mapping_file, city, known, skips)
        if link:
            sv_captions = _find(street, f"{city}_streetview_captions.jsonl")
            if sv_captions is not None:
                table = _streetview_captions(sv_captions, link, skips)
                if len(table):
                    out["streetview_caption"] = table
            sv_rows: list[tuple[Any, ...]] = []
            for path in sorted(p for p in street.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
                if path.name in link:
                    lonlat = streetview_lonlat(path.name)
                    if lonlat is None:
                        skips.add("streetview_image", "no lon,lat in the file name")
                        continue
                    sv_rows.append((link[path.name], str(path), path.name, *lonlat))
            if sv_rows:
                out["streetview_image"] = pd.DataFrame(sv_rows, columns=["region_id", "image", "item", "lon", "lat"])
    for table in out.values():
        table["region_id"] = table["region_id"].astype(ids.dtype)
    return out


def _find(folder: Path, name: str) -> Path | None:
    """``folder/name`` matched case-insensitively."""
    if not folder.is_dir():
        return None
    for path in folder.iterdir():
        if path.name.lower() == name.lower():
            return path
    return None


def _tile_captions(path: Path, known: set[Any], skips: SkipLog) -> pd.DataFrame:
    data = load_json(path)
    entries = _flatten(data)
    if entries is None:
        raise DataError(f"{path}: expected a list of {{'caption', 'image'}} objects")
    rows = []
    for entry in entries:
        if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
            skips.add("tile_caption", "entry without 'image' and 'caption'")
            continue
        text = entry["caption"]
        if not isinstance(text, str) or not text.strip():
            skips.add("tile_caption", "empty caption")
            continue
        tid = tile_id(str(entry["image"]))
        if tid not in known:
            skips.add("tile_caption", "caption names a tile not in the labels")
            continue
        rows.append((tid, text.strip()))
    return pd.DataFrame(rows, columns=["region_id", "text"])


def _flatten(data: Any) -> list[Any] | None:
    if not isinstance(data, list):
        return None
    out: list[Any] = []
    for item in data:
        if isinstance(item, list):
            out.extend(item)
        else:
            out.append(item)
    return out


def _streetview_links(path: Path, city: str, known: set[Any], skips: SkipLog) -> dict[str, Any]:
    """Street-view image name -> tile id, for the tiles of ``city``."""
    mapping = load_json(path)
    if not isinstance(mapping, dict):
        raise DataError(f"{path}: expected an object tile image -> list of street-view image names")
    link: dict[str, Any] = {}
    prefix = city.lower() + "/"
    for key, names in mapping.items():
        if not str(key).lower().startswith(prefix):
            continue
        tid = tile_id(str(key))
        if not isinstance(names, list):
            raise DataError(f"{path}: tile {key!r}: expected a list of street-view image names")
        if tid not in known:
            skips.add("streetview", "mapping names a tile not in the labels", len(names))
            continue
        for name in names:
            link[str(name)] = tid
    return link


def _streetview_captions(path: Path, link: dict[str, Any], skips: SkipLog) -> pd.DataFrame:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {number}: not valid JSON ({first_line(err)})") from None
            if not isinstance(entry, dict):
                skips.add("streetview_caption", "line is not an object")
                continue
            name, text = str(entry.get("image", "")), entry.get("caption")
            if not isinstance(text, str) or not text.strip():
                skips.add("streetview_caption", "empty caption")
                continue
            if name not in link:
                skips.add("streetview_caption", "image not linked to any tile")
                continue
            lonlat = streetview_lonlat(name)
            if lonlat is None:
                skips.add("streetview_caption", "no lon,lat in the image name")
                continue
            rows.append((link[name], name, text.strip(), *lonlat))
    return pd.DataFrame(rows, columns=["region_id", "item", "text", "lon", "lat"])


def readable_images(paths: Iterable[str | Path]) -> tuple[np.ndarray, dict[str, str]]:
    """Which image files open and decode: a boolean mask and ``{path: reason}`` for the bad ones."""
    from PIL import Image, UnidentifiedImageError

    ok, bad = [], {}
    for path in map(Path, paths):
        reason = None
        if not path.is_file():
            reason = "file not found"
        else:
            try:
                with Image.open(path) as img:
                    img.convert("RGB").load()
            except (UnidentifiedImageError, OSError, ValueError) as err:
                reason = f"not a readable image ({first_line(err)})"
        ok.append(reason is None)
        if reason is not None:
            bad[str(path)] = reason
    return np.array(ok, dtype=bool), bad


def parse_poi_dict(value: str, where: str) -> dict[str, float]:
    """A ``{'category': count, ...}`` cell (Python-literal syntax, parsed without evaluating code)."""
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise DataError(f"{where}: 'poi' {value[:40]!r} is not a {{category: count}} mapping") from None
    if not isinstance(parsed, dict) or not all(isinstance(v, int | float) for v in parsed.values()):
        raise DataError(f"{where}: 'poi' {value[:40]!r} is not a {{category: count}} mapping")
    return {str(k): float(v) for k, v in parsed.items()}


def geo_text_from_prompts(path: Path, ids: pd.Index) -> pd.DataFrame:
    """Chicago's geo-text: the last text item of each region's message in ``prompts/prompt_data.json``
    (centroid, street address, POI summary), one row per region."""
    messages = load_json(path)
    if not isinstance(messages, list) or len(messages) != len(ids):
        raise DataError(f"{path}: expected a list of {len(ids)} region messages")
    rows = []
    for region, message in zip(ids, messages, strict=True):
        content = message.get("content", []) if isinstance(message, dict) else []
        texts = [c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text"]
        if not texts or not str(texts[-1]).strip():
            raise DataError(f"{path}: region {region}: no text item")
        rows.append((region, str(texts[-1]).strip()))
    return pd.DataFrame(rows, columns=["region_id", "text"])
