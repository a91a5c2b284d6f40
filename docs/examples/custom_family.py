"""Worked example: a new dataset family in one module plus one registration (see docs/extending.md).

The family `csv-city` reads a folder `csv/<city>/` of the data directory holding three plain tables:
`regions.csv` (`region_id`, `lon`, `lat`), `poi_counts.csv` (`region_id` then one column per category) and
`targets.csv` (`region_id` then one column per indicator). Every folder there is the dataset
`csv-<city>`; `urbanprofile datasets`, `evaluate` and `benchmark` find it from the registration.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import geopandas as gpd
import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.data.registry import DatasetEntry, DatasetFamily, register_family
from urbanprofile.errors import DataError

FILES = ("regions.csv", "poi_counts.csv", "targets.csv")


def discover(root: Path) -> Iterator[DatasetEntry]:
    """The `csv/<city>/` folders of a data directory (files listed as missing are reported on load)."""
    folder = root / "csv"
    if not folder.is_dir():
        return
    for city in sorted(p for p in folder.iterdir() if p.is_dir()):
        missing = tuple(f for f in FILES if not (city / f).is_file())
        yield DatasetEntry(f"csv-{city.name.lower()}", "csv-city", city, missing)


def _table(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path)
    if "region_id" not in frame.columns:
        raise DataError(f"{path}: no 'region_id' column")
    return frame.set_index("region_id")


def load(entry: DatasetEntry) -> CityData:
    """Read one `csv/<city>/` folder (the caller validates the result)."""
    regions = _table(entry.path / "regions.csv")
    for column in ("lon", "lat"):
        if column not in regions.columns:
            raise DataError(f"{entry.path / 'regions.csv'}: no {column!r} column")
    geo = gpd.GeoDataFrame(regions[["lon", "lat"]], geometry=gpd.points_from_xy(regions["lon"], regions["lat"]),
                           crs="EPSG:4326")
    geo.index.name = "region_id"
    poi = _table(entry.path / "poi_counts.csv").reindex(geo.index).fillna(0.0)
    targets = _table(entry.path / "targets.csv").reindex(geo.index)
    meta = {"source": str(entry.path), "family": "csv-city", "city": entry.path.name.lower(),
            "description": f"{len(geo)} regions read from CSV tables"}
    return CityData(entry.name, geo, {"poi_counts": poi}, targets, meta=meta)


def register() -> DatasetFamily:
    """The one registration: after it, `csv-<city>` folders are datasets like any other."""
    return register_family(DatasetFamily("csv-city", discover, load, folders=("csv",)), replace=True)
