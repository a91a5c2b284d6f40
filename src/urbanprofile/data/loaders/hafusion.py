"""Loader for the HAFusion multi-view benchmark layout (``hafusion/<city>/*.npy``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from urbanprofile.data.city import CityData, frame_from_array
from urbanprofile.data.io import centroid_lonlat, load_json, load_npy, read_vector
from urbanprofile.data.loaders.multimodal import geo_text_from_prompts
from urbanprofile.errors import DataError

#: Label files and the task names they become.
LABEL_FILES = {"checkin": "check_counts.npy", "crime": "crime_counts.npy", "service_calls": "serviceCall_counts.npy"}

#: The peers' fold settings per city (data README); any other city gets DEFAULT_PROTOCOL.
PEER_PROTOCOLS: dict[str, dict[str, Any]] = {
    "nyc": {"n_splits": 10, "shuffle": False, "random_state": None, "drop_zero": []},
    "chicago": {"n_splits": 25, "shuffle": True, "random_state": 2024, "drop_zero": ["checkin"]},
    "sf": {"n_splits": 10, "shuffle": True, "random_state": 2024, "drop_zero": ["checkin"]},
}
DEFAULT_PROTOCOL: dict[str, Any] = {"n_splits": 10, "shuffle": True, "random_state": 2024, "drop_zero": ["checkin"]}

#: Region ids of known cities: Chicago's index i is community area i + 1.
ID_OFFSETS = {"chicago": 1}

_CENTROID = re.compile(r"Centroid Coordinates:\s*\(\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*\)")


def load_hafusion_city(folder: Path, name: str) -> CityData:
    """Read one city folder of the HAFusion layout into a :class:`CityData`."""
    city = folder.name.lower()
    poi = load_npy(folder / "poi_dist.npy", ndim=2)
    n = poi.shape[0]
    ids = pd.Index(np.arange(n) + ID_OFFSETS.get(city, 0), name="region_id")
    landuse = load_npy(folder / "landUse_dist.npy", ndim=2)
    _same_regions(folder / "landUse_dist.npy", landuse.shape[0], n)
    od = load_npy(folder / "mob_dist.npy", ndim=2)
    _square(folder / "mob_dist.npy", od, n)

    views: dict[str, pd.DataFrame] = {
        "poi_counts": frame_from_array(poi, ids, [f"poi_{k}" for k in range(poi.shape[1])]),
        "landuse_counts": frame_from_array(landuse, ids, [f"landuse_{k}" for k in range(landuse.shape[1])]),
        "od_flows": frame_from_array(od, ids, ids),
    }
    for view, file in (("od_target", "mob-adj.npy"), ("poi_similarity", "poi_simi.npy"),
                       ("landuse_similarity", "landUse_simi.npy")):
        if (folder / file).is_file():
            matrix = load_npy(folder / file, ndim=2)
            _square(folder / file, matrix, n)
            views[view] = frame_from_array(matrix, ids, ids)
    if (folder / "mob_patterns.npy").is_file():
        patterns = load_npy(folder / "mob_patterns.npy", ndim=3)
        if patterns.shape[1:] != (n, n):
            raise DataError(f"{folder / 'mob_patterns.npy'}: wrong shape {patterns.shape}, expected Px{n}x{n}")
        flat = patterns.transpose(1, 0, 2).reshape(n, -1)
        columns = pd.MultiIndex.from_product([range(patterns.shape[0]), ids], names=["pattern", "destination"])
        views["od_patterns"] = frame_from_array(flat, ids, columns)

    targets = pd.DataFrame(index=ids)
    for task, file in LABEL_FILES.items():
        label = load_npy(folder / file, ndim=1)
        _same_regions(folder / file, label.shape[0], n)
        if np.isnan(label.astype(float)).any():
            raise DataError(f"{folder / file}: NaN label for region {ids[int(np.argmax(np.isnan(label)))]}")
        if (label < 0).any():
            raise DataError(f"{folder / file}: negative count for region {ids[int(np.argmax(label < 0))]}")
        targets[task] = label.astype(float)

    regions = _regions(folder, ids)
    neighbors = None
    if (folder / "neighbors.json").is_file():
        neighbors = _neighbors(folder / "neighbors.json", ids)
    if (folder / "landuse_district.json").is_file():
        district = load_json(folder / "landuse_district.json")
        regions["landuse_district"] = _per_region(folder / "landuse_district.json", district, ids)

    protocol = PEER_PROTOCOLS.get(city, DEFAULT_PROTOCOL)
    meta: dict[str, Any] = {
        "source": str(folder),
        "family": "hafusion",
        "city": city,
        "description": f"{n} regions, HAFusion multi-view layout",
        "units": {"checkin": "check-ins", "crime": "crimes", "service_calls": "311 calls"},
        "paper_folds": {k: protocol[k] for k in ("n_splits", "shuffle", "random_state")},
        "drop_zero": list(protocol["drop_zero"]),
        "location_source": regions.attrs.pop("location_source", "none"),
        "notes": [],
    }
    if city not in PEER_PROTOCOLS:
        meta["notes"].append("no peer fold settings for this city: 10 shuffled folds, seed 2024")
    modalities: dict[str, pd.DataFrame] = {}
    prompts = folder / "prompts" / "prompt_data.json"
    if prompts.is_file():
        modalities["geo_text"] = geo_text_from_prompts(prompts, ids)
    return CityData(name=name, regions=regions, views=views, targets=targets, neighbors=neighbors, meta=meta,
                    modalities=modalities)


def _same_regions(path: Path, got: int, n: int) -> None:
    if got != n:
        raise DataError(f"{path}: has {got} regions but poi_dist.npy has {n}")


def _square(path: Path, matrix: np.ndarray, n: int) -> None:
    if matrix.shape != (n, n):
        raise DataError(f"{path}: must be square {n}x{n} (regions x regions), got {matrix.shape}")


def _regions(folder: Path, ids: pd.Index) -> Any:
    """Polygons from ``regions/*.shp`` when present, else centroids from ``prompts/prompt_data.json``."""
    import geopandas as gpd

    shapes = sorted((folder / "regions").glob("*.shp")) if (folder / "regions").is_dir() else []
    if shapes:
        frame = read_vector(shapes[0])
        if len(frame) != len(ids):
            raise DataError(f"{shapes[0]}: has {len(frame)} regions but poi_dist.npy has {len(ids)}")
        if "region_id" in frame.columns:
            order = pd.to_numeric(frame["region_id"], errors="coerce").to_numpy()
            expected = np.arange(len(ids))
            if np.isnan(order).any() or sorted(order.astype(int).tolist()) != expected.tolist():
                raise DataError(f"{shapes[0]}: field 'region_id' must hold 0..{len(ids) - 1} once each")
            frame = frame.iloc[np.argsort(order)]
        invalid = ~frame.geometry.is_valid
        if invalid.any():
            raise DataError(f"{shapes[0]}: invalid geometry for region {int(np.where(invalid)[0][0])}")
        geometry = frame.geometry.to_numpy()
        regions = gpd.GeoDataFrame(index=ids, geometry=list(geometry), crs="EPSG:4326")
        regions["lon"], regions["lat"] = centroid_lonlat(regions.geometry)
        regions.attrs["location_source"] = f"polygons ({shapes[0].name})"
        return regions
    prompts = folder / "prompts" / "prompt_data.json"
    if prompts.is_file():
        lonlat = _centroids_from_prompts(prompts, len(ids))
        regions = gpd.GeoDataFrame(
            {"lon": lonlat[:, 0], "lat": lonlat[:, 1]},
            index=ids,
            geometry=gpd.points_from_xy(lonlat[:, 0], lonlat[:, 1]),
            crs="EPSG:4326",
        )
        regions.attrs["location_source"] = "centroids (prompts/prompt_data.json)"
        return regions
    regions = gpd.GeoDataFrame(index=ids, geometry=gpd.GeoSeries([None] * len(ids), index=ids), crs="EPSG:4326")
    regions.attrs["location_source"] = "none"
    return regions


def _centroids_from_prompts(path: Path, n: int) -> np.ndarray:
    messages = load_json(path)
    if not isinstance(messages, list) or len(messages) != n:
        got = len(messages) if isinstance(messages, list) else type(messages).__name__
        raise DataError(f"{path}: expected a list of {n} region messages, got {got}")
    lonlat = np.empty((n, 2))
    for i, message in enumerate(messages):
        content = message.get("content", []) if isinstance(message, dict) else []
        texts = [c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text"]
        match = _CENTROID.search(texts[-1]) if texts else None
        if match is None:
            raise DataError(f"{path}: region {i}: no 'Centroid Coordinates: (lat, lon)' in the last text item")
        lat, lon = float(match.group(1)), float(match.group(2))
        if not (-90 <= lat <= 90 and -180 <= lon <= 180):
            raise DataError(f"{path}: region {i}: centroid ({lat}, {lon}) is not a lat/lon pair")
        lonlat[i] = lon, lat
    return lonlat


def _keys_to_ids(path: Path, mapping: Any, ids: pd.Index) -> dict[Any, Any]:
    """Map a JSON object keyed by array index (strings ``"0".."N-1"``) to region ids."""
    if not isinstance(mapping, dict):
        raise DataError(f"{path}: expected an object keyed by region index")
    out: dict[Any, Any] = {}
    for key, value in mapping.items():
        try:
            index = int(key)
        except ValueError:
            raise DataError(f"{path}: key {key!r} is not a region index") from None
        if not 0 <= index < len(ids):
            raise DataError(f"{path}: region index {index} is out of range 0..{len(ids) - 1}")
        out[ids[index]] = value
    return out


def _neighbors(path: Path, ids: pd.Index) -> dict[Any, list[Any]]:
    raw = _keys_to_ids(path, load_json(path), ids)
    neighbors: dict[Any, list[Any]] = {region: [] for region in ids}
    for region, adjacent in raw.items():
        if not isinstance(adjacent, list):
            raise DataError(f"{path}: neighbors of region {region} must be a list")
        for a in adjacent:
            if not isinstance(a, int) or not 0 <= a < len(ids):
                raise DataError(f"{path}: region {region} lists unknown neighbour {a}")
            neighbors[region].append(ids[a])
    return neighbors


def _per_region(path: Path, mapping: Any, ids: pd.Index) -> pd.Series:
    values = _keys_to_ids(path, mapping, ids)
    missing = [r for r in ids if r not in values]
    if missing:
        raise DataError(f"{path}: no value for region {missing[0]}")
    return pd.Series([values[r] for r in ids], index=ids)
