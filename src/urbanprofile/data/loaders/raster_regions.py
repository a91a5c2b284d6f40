"""Regions drawn on a real raster scene (e.g. ``olinda/``: 470 census sectors over a Landsat-7 scene).

A folder holding one polygon file (``*.shp``/``*.gpkg``/``*.geojson``) and one GeoTIFF is a dataset named
after the folder. Region ids come from an ``ID`` attribute when present (else the row number); numeric
attributes other than ids and codes (``ID``, ``CD_*``) are the tasks (Olinda: ``V014``). Each region gets one
image, cut from the raster by :func:`urbanprofile.encoders.image.cut_region_images` when encoded (modality
``region_image``); the raster's CRS may differ from the polygons' (they are reprojected).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.data.io import centroid_lonlat, read_vector
from urbanprofile.errors import DataError

VECTOR_SUFFIXES = (".shp", ".gpkg", ".geojson")
RASTER_SUFFIXES = (".tif", ".tiff")


def raster_region_files(folder: Path) -> tuple[Path, Path] | None:
    """The (polygons, raster) pair of a folder, or ``None`` when it does not hold exactly one of each."""
    vectors = sorted(p for p in folder.iterdir() if p.suffix.lower() in VECTOR_SUFFIXES)
    rasters = sorted(p for p in folder.iterdir() if p.suffix.lower() in RASTER_SUFFIXES)
    if len(vectors) != 1 or len(rasters) != 1:
        return None
    return vectors[0], rasters[0]


def load_raster_regions(folder: Path, name: str) -> CityData:
    """Read a polygons + raster folder into a :class:`CityData` with a ``region_image`` modality."""
    import geopandas as gpd

    files = raster_region_files(folder)
    if files is None:
        raise DataError(f"{folder}: expected exactly one polygon file and one GeoTIFF")
    vector, raster = files
    frame = read_vector(vector)
    if frame.empty:
        raise DataError(f"{vector}: no regions")
    if "ID" in frame.columns:
        raw = pd.to_numeric(frame["ID"], errors="coerce")
        if raw.isna().any() or (raw != raw.round()).any():
            raise DataError(f"{vector}: field 'ID' must hold whole numbers")
        ids = pd.Index(raw.astype(np.int64).to_numpy(), name="region_id")
    else:
        ids = pd.Index(np.arange(len(frame)), name="region_id")
    if ids.has_duplicates:
        raise DataError(f"{vector}: region {ids[ids.duplicated()][0]} appears more than once")
    geometry = frame.geometry.make_valid() if (~frame.geometry.is_valid).any() else frame.geometry
    regions = gpd.GeoDataFrame(index=ids, geometry=list(geometry.to_numpy()), crs="EPSG:4326")
    regions["lon"], regions["lat"] = centroid_lonlat(regions.geometry)
    tasks = [c for c in frame.columns if c != "geometry" and c != "ID" and not str(c).upper().startswith("CD_")
             and pd.api.types.is_numeric_dtype(frame[c])]
    if not tasks:
        raise DataError(f"{vector}: no numeric attribute to predict")
    targets = pd.DataFrame({t: pd.to_numeric(frame[t]).to_numpy(dtype=float) for t in tasks}, index=ids)
    text = [c for c in frame.columns if c != "geometry" and c not in tasks and c != "ID"]
    for column in text:
        regions[str(column)] = frame[column].astype(str).to_numpy()
    meta: dict[str, Any] = {
        "source": str(folder),
        "family": "raster-regions",
        "city": folder.name.lower(),
        "description": f"{len(ids)} regions ({vector.name}) over the raster {raster.name}",
        "units": {t: "as published" for t in tasks},
        "paper_folds": {"n_splits": 10, "shuffle": True, "random_state": 2024},
        "drop_zero": [],
        "task_scale": {t: "log1p" for t in tasks if (targets[t].dropna() >= 0).all()},
        "location_source": f"polygon centroids ({vector.name})",
        "raster": str(raster),
        "notes": [f"one image per region cut from {raster.name} (modality region_image)"],
    }
    modalities = {"region_image": pd.DataFrame({"region_id": ids, "raster": str(raster)})}
    return CityData(name=name, regions=regions, views={}, targets=targets, neighbors=None, meta=meta,
                    modalities=modalities)
