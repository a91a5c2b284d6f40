"""Indicator values per region, from a table keyed by region id, from points, or from region fields."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from urbanprofile.data.build.join import assign_points, check_points_inside
from urbanprofile.data.build.messages import few, listed
from urbanprofile.data.build.points import has_geo_metadata, read_points
from urbanprofile.data.build.regions import id_keys, missing_ids
from urbanprofile.data.build.spec import BuildReport, BuildSpec
from urbanprofile.data.io import not_a_number, parse_numbers, read_raw_table
from urbanprofile.errors import DataError

if TYPE_CHECKING:
    import geopandas as gpd


def _numeric_columns(
    table: pd.DataFrame, wanted: list[str] | None, exclude: set[str], where: str, report: BuildReport,
    row_name: Callable[[int], str],
) -> pd.DataFrame:
    """The label columns as floats, read strictly.

    Empty cells and NA tokens (``NA``, ``n/a``, ``null``...) are missing labels, counted per column in
    ``report``; any other value that is not a number (``12,5``) is an error naming its row. Without
    ``wanted``, columns holding no number at all (names, codes with letters) are not labels and are listed in
    ``report``; a label column with no value at all is an error.
    """
    if wanted is not None:
        missing = [c for c in wanted if c not in table.columns]
        if missing:
            raise DataError(f"{where}: no label column {missing[0]!r} (columns: {listed(table.columns)})")
    candidates = wanted if wanted is not None else [c for c in table.columns if c not in exclude]
    out: dict[str, np.ndarray] = {}
    for column in candidates:
        values = table[column]
        numbers, absent, bad = parse_numbers(values)
        numeric_dtype = pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)
        text = values[bad].astype(str).str.strip()
        looks_numeric = (~absent & ~bad).any() or text.str.fullmatch(r"[+-]?\d+,\d+").any()
        if wanted is None and (absent.all() or (not numeric_dtype and not looks_numeric)):
            report.label_columns_skipped.append(str(column) + (" (empty)" if absent.all() else ""))
            continue
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(f"{row_name(row)}: label {str(column)!r}: {not_a_number(values.iloc[row])} "
                            f"({int(bad.sum())} such values in the column)")
        if np.isinf(numbers).any():
            raise DataError(f"{row_name(int(np.argmax(np.isinf(numbers))))}: label {str(column)!r} is infinite")
        if absent.all():
            raise DataError(f"{where}: label column {str(column)!r} has no value (all {len(values)} are missing)")
        if absent.any():
            report.label_values_missing[str(column)] = int(absent.sum())
        out[str(column)] = numbers
    if not out:
        raise DataError(f"{where}: no numeric label column (columns: {listed(table.columns)})")
    return pd.DataFrame(out, index=table.index)


def labels_for_regions(
    regions: gpd.GeoDataFrame, attributes: pd.DataFrame | None, spec: BuildSpec, report: BuildReport
) -> pd.DataFrame:
    """Indicator values per region: from a table keyed by region id, from points, or from region fields.

    Raises:
        DataError: A value is not a number (naming its row), a label column is empty or has no value for any
            region, or no label row matches a region.
    """
    ids = regions.index
    if spec.labels is None:
        if attributes is None:
            raise DataError("label columns from the regions file need --regions (H3 cells have no fields)")
        values = _numeric_columns(attributes, spec.label_columns, set(), str(spec.regions), report,
                                  lambda row: f"{spec.regions}, region {ids[row]!r}")
        report.n_label_rows = len(values)
        out = values.set_axis(ids)
    else:
        out = _labels_from_file(Path(spec.labels), regions, spec, report)
    out.index.name = "region_id"
    empty = [c for c in out.columns if out[c].isna().all()]
    if empty:
        raise DataError(f"{spec.labels or spec.regions}: label {empty[0]!r} has no value for any region "
                        "(its values belong to rows that match no region)")
    report.n_regions_unlabelled = int(out.isna().all(axis=1).sum())
    return out


def _labels_from_file(path: Path, regions: gpd.GeoDataFrame, spec: BuildSpec, report: BuildReport) -> pd.DataFrame:
    ids = regions.index
    raw = None
    if path.suffix.lower() in (".csv", ".tsv", ".txt") or not has_geo_metadata(path):
        raw = read_raw_table(path)
        table = raw.frame
        has_points = {spec.lon_column, spec.lat_column} <= set(table.columns)
        if spec.label_id_column not in table.columns and not has_points:
            raise DataError(f"{path}: no id column {spec.label_id_column!r} (columns: {listed(table.columns)}; "
                            "use --label-id-column, or give lon/lat columns for point values)")
        if spec.label_id_column not in table.columns:
            raw = None
    if raw is not None:
        if raw.malformed:
            raise DataError(f"{path} line {raw.malformed[0]}: wrong number of fields "
                            f"({len(raw.malformed)} such rows)")
        table = raw.frame
        no_id = missing_ids(table[spec.label_id_column])
        report.n_label_rows_no_id = int(no_id.sum())
        table = table[~no_id]
        keys = id_keys(table[spec.label_id_column])
        if keys.has_duplicates:
            raise DataError(f"{path}: duplicate region ids {few(keys[keys.duplicated()])}")
        region_keys = id_keys(ids)
        matched = keys.isin(region_keys)
        if not matched.any():
            hint = ""
            stripped = pd.Index(keys.str.lstrip("0")).isin(pd.Index(region_keys.str.lstrip("0")))
            if stripped.any():
                hint = "; they would match without leading zeros: write the ids the same way in both files"
            raise DataError(f"{path}: no id in column {spec.label_id_column!r} matches a region "
                            f"(labels have {few(keys)}; regions have {few(region_keys)}){hint}")
        lines = raw.lines[~no_id]
        unit = "line" if raw.is_text else "row"
        values = _numeric_columns(table.reset_index(drop=True), spec.label_columns, {spec.label_id_column},
                                  str(path), report, lambda row: f"{path} {unit} {lines[row]}")
        values.index = keys
        report.n_label_rows = len(raw.frame)
        report.n_label_rows_unmatched = int((~matched).sum())
        return values[matched].reindex(region_keys).set_axis(ids)
    points = read_points(path, spec.crs, spec.lon_column, spec.lat_column)
    values = _numeric_columns(points.frame, spec.label_columns, {"lon", "lat"}, str(path), report, points.where)
    lon, lat = points.frame["lon"].to_numpy(float), points.frame["lat"].to_numpy(float)
    position = assign_points(lon, lat, regions, spec.engine)
    inside = position >= 0
    dropped = points.n_rows - len(points.frame)
    report.n_label_rows = points.n_rows
    report.n_label_rows_unmatched = int((~inside).sum()) + dropped
    check_points_inside(lon, lat, position, regions, spec.engine, str(path), "labelled points")
    grouped = values[inside].groupby(position[inside]).agg(spec.label_agg)
    return grouped.reindex(range(len(ids))).set_axis(ids)


