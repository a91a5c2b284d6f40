"""Loader for CityView satellite-tile indicators (``cityview/labels/<City>.csv``): tiles as regions."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.errors import DataError

#: CSV column -> task name.
LABEL_COLUMNS = {
    "carbon_emissions (ton)": "carbon",
    "population (unit)": "population",
    "gdp (million yuan)": "gdp",
}
UNITS = {"carbon": "ton CO2 (ODIAC)", "population": "people (WorldPop)", "gdp": "million yuan"}
#: GDP is exactly this for 12-20% of tiles: a fill or cap value, treated as missing.
GDP_FILL = 10000.0
_PAIR = re.compile(r"^\(\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*\)$")


def load_cityview_city(csv: Path, name: str) -> CityData:
    """Read a CityView label table into a :class:`CityData` whose regions are the tiles."""
    import geopandas as gpd

    try:
        table = pd.read_csv(csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{csv}: not a readable CSV ({str(err).splitlines()[0]})") from None
    required = ["satellite_img_name", "WGS84 coordinate", *LABEL_COLUMNS]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise DataError(f"{csv}: missing column {missing[0]!r}")
    if table.empty:
        raise DataError(f"{csv}: no rows")

    ids = pd.Index([_tile_id(str(v)) for v in table["satellite_img_name"]], name="region_id")
    if ids.has_duplicates:
        raise DataError(f"{csv}: tile {ids[ids.duplicated()][0]} appears more than once")
    lonlat = np.empty((len(table), 2))
    for row, value in enumerate(table["WGS84 coordinate"].astype(str)):
        match = _PAIR.match(value.strip())
        if match is None:
            raise DataError(f"{csv}: tile {ids[row]}: 'WGS84 coordinate' {value!r} is not '(lat, lon)'")
        lat, lon = float(match.group(1)), float(match.group(2))
        if not (-90 <= lat <= 90 and -180 <= lon <= 180):
            raise DataError(f"{csv}: tile {ids[row]}: coordinate ({lat}, {lon}) is out of range")
        lonlat[row] = lon, lat

    targets = pd.DataFrame(index=ids)
    for column, task in LABEL_COLUMNS.items():
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)
        bad = np.isnan(values) & table[column].notna().to_numpy()
        if bad.any():
            raise DataError(f"{csv}: tile {ids[int(np.argmax(bad))]}: {column!r} is not a number")
        if (values < 0).any():
            raise DataError(f"{csv}: tile {ids[int(np.argmax(values < 0))]}: {column!r} is negative")
        targets[task] = values
    fill = targets["gdp"] == GDP_FILL
    n_fill = int(fill.sum())
    targets.loc[fill, "gdp"] = np.nan

    regions = gpd.GeoDataFrame(
        {"lon": lonlat[:, 0], "lat": lonlat[:, 1]},
        index=ids,
        geometry=gpd.points_from_xy(lonlat[:, 0], lonlat[:, 1]),
        crs="EPSG:4326",
    )
    meta: dict[str, Any] = {
        "source": str(csv),
        "family": "cityview",
        "city": csv.stem.lower(),
        "description": f"{len(ids)} Baidu zoom-16 satellite tiles (~1 km), CityView",
        "units": UNITS,
        "paper_folds": {"n_splits": 10, "shuffle": True, "random_state": 2024},
        "drop_zero": [],
        "task_scale": {task: "log1p" for task in LABEL_COLUMNS.values()},
        "location_source": "tile centres (WGS84 coordinate)",
        "gdp_fill_missing": n_fill,
        "notes": [
            f"gdp == {GDP_FILL} (fill/cap value) on {n_fill} tiles treated as missing",
            "labels are evaluated on the log1p scale, as in UrbanCLIP/UrbanVLP",
        ],
    }
    return CityData(name=name, regions=regions, views={}, targets=targets, neighbors=None, meta=meta)


def _tile_id(image_name: str) -> str:
    """``Beijing/16_12659_4738_s.jpg`` -> ``16_12659_4738``."""
    stem = Path(image_name).stem
    return stem[:-2] if stem.endswith("_s") else stem
