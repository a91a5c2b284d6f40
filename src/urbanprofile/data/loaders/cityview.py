"""Loader for CityView satellite-tile indicators (``cityview/labels/<City>.csv``): tiles as regions."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from urbanprofile.data.city import CityData, frame_from_array
from urbanprofile.data.loaders.multimodal import SkipLog, cityview_modalities, parse_poi_dict
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

    skips = SkipLog()
    city_name = csv.stem
    modalities = cityview_modalities(csv.parent.parent, city_name, ids, skips)
    skips.to_meta(meta)
    return CityData(name=name, regions=regions, views={}, targets=targets, neighbors=None, meta=meta,
                    modalities=modalities)


def _tile_id(image_name: str) -> str:
    """``Beijing/16_12659_4738_s.jpg`` -> ``16_12659_4738``."""
    stem = Path(image_name).stem
    return stem[:-2] if stem.endswith("_s") else stem


#: Columns of ``<city>_indicators_urbanvlp.csv`` that are tasks (values as published: carbon, population and
#: GDP already on a log scale, night light and house price raw).
URBANVLP_TASKS = ("carbon", "population", "gdp", "nightlight", "houseprice")
#: House price is exactly this on a few tiles (the same fill value as CityView's GDP): missing.
HOUSEPRICE_FILL = 10000.0
_TILE_XY = re.compile(r"^\(\s*(\d+)\s*,\s*(\d+)\s*\)$")


def load_urbanvlp_indicators(csv: Path, name: str) -> CityData:
    """UrbanVLP's indicator table (e.g. 440 Beijing tiles) as a dataset.

    Tiles are placed with the WGS84 centres of ``labels/<City>.csv``; the 14 POI counts become the
    ``poi_counts`` view; UrbanVLP's own ``houseprice_predict`` is kept in ``regions`` (column
    ``urbanvlp_houseprice_predict``) to compare against, never as a feature. Captions and street view come
    from the city's CityView files, as for ``cityview-<city>``.
    """
    import geopandas as gpd

    table = _read(csv)
    required = ["Coordinate", "poi", *URBANVLP_TASKS, "houseprice_predict"]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise DataError(f"{csv}: missing column {missing[0]!r}")
    ids_list = []
    for value in table["Coordinate"].astype(str):
        match = _TILE_XY.match(value.strip())
        if match is None:
            raise DataError(f"{csv}: 'Coordinate' {value!r} is not '(tile x, tile y)'")
        ids_list.append(f"16_{match.group(1)}_{match.group(2)}")
    ids = pd.Index(ids_list, name="region_id")
    if ids.has_duplicates:
        raise DataError(f"{csv}: tile {ids[ids.duplicated()][0]} appears more than once")
    city = csv.name.split("_indicators")[0]
    labels = next((p for p in (csv.parent / "labels").glob("*.csv") if p.stem.lower() == city.lower()), None)
    if labels is None:
        raise DataError(f"{csv}: no labels/{city.title()}.csv beside it to place the tiles")
    base = load_cityview_city(labels, f"cityview-{city.lower()}")
    unknown = ids.difference(base.region_ids)
    if len(unknown):
        raise DataError(f"{csv}: tile {unknown[0]} is not in {labels}")
    lonlat = base.regions.loc[ids, ["lon", "lat"]].to_numpy(dtype=float)

    poi_rows = [parse_poi_dict(str(v), f"{csv}: tile {tid}") for tid, v in zip(ids, table["poi"], strict=True)]
    categories = sorted({k for row in poi_rows for k in row})
    poi = np.array([[row.get(c, 0.0) for c in categories] for row in poi_rows])
    targets = pd.DataFrame(index=ids)
    for task in URBANVLP_TASKS:
        values = pd.to_numeric(table[task], errors="coerce").to_numpy(dtype=float)
        if np.isnan(values).any():
            raise DataError(f"{csv}: tile {ids[int(np.argmax(np.isnan(values)))]}: {task!r} is not a number")
        targets[task] = values
    fill = targets["houseprice"] == HOUSEPRICE_FILL
    targets.loc[fill, "houseprice"] = np.nan
    regions = gpd.GeoDataFrame(
        {"lon": lonlat[:, 0], "lat": lonlat[:, 1],
         "urbanvlp_houseprice_predict": pd.to_numeric(table["houseprice_predict"], errors="coerce").to_numpy()},
        index=ids, geometry=gpd.points_from_xy(lonlat[:, 0], lonlat[:, 1]), crs="EPSG:4326",
    )
    meta: dict[str, Any] = {
        "source": str(csv),
        "family": "cityview-urbanvlp",
        "city": city.lower(),
        "description": f"{len(ids)} {city.title()} tiles with UrbanVLP's six indicators",
        "units": {"carbon": "log ton CO2", "population": "log people", "gdp": "log million yuan",
                  "nightlight": "radiance", "houseprice": "yuan per m2"},
        "paper_folds": {"n_splits": 10, "shuffle": True, "random_state": 2024},
        "drop_zero": [],
        "task_scale": {"nightlight": "log1p", "houseprice": "log1p"},
        "location_source": f"tile centres ({labels.name})",
        "peer_predictions": {"houseprice": "urbanvlp_houseprice_predict"},
        "notes": [
            f"houseprice == {HOUSEPRICE_FILL} (fill value) on {int(fill.sum())} tiles treated as missing",
            "carbon, population and gdp are published on a log scale already",
            "column urbanvlp_houseprice_predict: UrbanVLP's own house-price prediction, for comparison only",
        ],
    }
    # The city's items, restricted to these tiles (items of the other tiles are not skips).
    modalities = {k: t[t["region_id"].isin(ids)].reset_index(drop=True) for k, t in base.modalities.items()}
    meta["modality_skips"] = base.meta.get("modality_skips", {})
    meta["notes"] += [n for n in base.meta.get("notes", []) if "skipped" in n]
    views = {"poi_counts": frame_from_array(poi, ids, [f"poi_{c}" for c in categories])}
    return CityData(name=name, regions=regions, views=views, targets=targets, neighbors=None, meta=meta,
                    modalities=modalities)


def _read(csv: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, FileNotFoundError) as err:
        raise DataError(f"{csv}: not a readable CSV ({str(err).splitlines()[0]})") from None
