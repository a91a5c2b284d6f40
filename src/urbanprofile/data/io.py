"""Readers for untrusted data files that fail with one line naming the file and what is wrong, and an
atomic writer (nothing half-written)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from urbanprofile.errors import DataError

if TYPE_CHECKING:
    import geopandas as gpd


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (readers of corrupt files raise long, many-line ones)."""
    text = str(err)
    return text.splitlines()[0] if text else type(err).__name__


def load_npy(path: Path, ndim: int | None = None, shape: tuple[int | None, ...] | None = None) -> np.ndarray:
    """Load a ``.npy`` array without pickle and check its rank and shape.

    Args:
        path: The file.
        ndim: Required number of dimensions.
        shape: Required shape; ``None`` entries match any length.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise DataError(f"{path}: holds an object array that needs pickle; refused (store numbers)") from None
        raise DataError(f"{path}: not a readable .npy file ({err})") from None
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npy file ({err})") from None
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path}: expected a single array, got {type(array).__name__}")
    if array.dtype.kind not in "biuf":
        raise DataError(f"{path}: expected numbers, got dtype {array.dtype}")
    if ndim is not None and array.ndim != ndim:
        raise DataError(f"{path}: expected a {ndim}-D array, got shape {array.shape}")
    if shape is not None and (
        len(shape) != array.ndim or any(s is not None and s != a for s, a in zip(shape, array.shape, strict=True))
    ):
        want = "x".join("N" if s is None else str(s) for s in shape)
        raise DataError(f"{path}: wrong shape {array.shape}, expected {want}")
    return array


def load_json(path: Path) -> Any:
    """Load a JSON file, naming it on failure."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None


def read_table(path: Path) -> pd.DataFrame:
    """A plain CSV or Parquet table (untrusted: no pickle, named on failure)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv", ".txt"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", low_memory=False)
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except Exception as err:  # pandas and pyarrow raise many types for a corrupt file
        raise DataError(f"{path}: cannot read table ({first_line(err)})") from None
    raise DataError(f"{path}: unsupported table format {suffix!r} (use .csv or .parquet)")


def read_vector(path: Path, crs: str | None = None) -> gpd.GeoDataFrame:
    """Read a vector file (shapefile, GeoPackage, GeoJSON, GeoParquet) into EPSG:4326.

    Args:
        path: The file.
        crs: CRS to assume when the file declares none; without it such a file is an error.
    """
    import geopandas as gpd

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        frame = gpd.read_parquet(path) if path.suffix.lower() == ".parquet" else gpd.read_file(path, engine="pyogrio")
    except Exception as err:  # the GIS readers raise many types for a corrupt file
        raise DataError(f"{path}: cannot read vector data ({first_line(err)})") from None
    if frame.crs is None:
        if crs is None:
            raise DataError(f"{path}: has no CRS (no .prj); pass the CRS it is in (e.g. --crs EPSG:4326)")
        frame = frame.set_crs(crs)
    if not frame.crs.equals("EPSG:4326"):
        frame = frame.to_crs("EPSG:4326")
    return frame


def centroid_lonlat(geoms: gpd.GeoSeries) -> tuple[np.ndarray, np.ndarray]:
    """Centroids of EPSG:4326 polygons, computed in the local UTM zone, as lon/lat degrees."""
    utm = geoms.estimate_utm_crs()
    centroids = geoms.to_crs(utm).centroid.to_crs("EPSG:4326")
    return centroids.x.to_numpy(), centroids.y.to_numpy()


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write beside the target and move into place, so a failure leaves no partial file.

    Args:
        path: The target file.
        write: Writes the content to the temporary path it is given.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
