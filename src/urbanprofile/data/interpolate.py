"""Areal interpolation of indicators from their own polygons (tracts, NTAs, districts) onto a dataset's regions.

Two ways, both through ``tobler`` (PySAL):

- **area-weighted**: a source polygon's extensive value (a count) is split by the share of its area inside each
  region; an intensive value (a rate, a median) is averaged over a region with the intersected areas as weights.
- **dasymetric**: with a weights layer (population points, or a population raster read as cell centres), the
  same, but with the weight (e.g. residents) in each source x region piece instead of its area; so a count goes
  where people live, and a rate is averaged over a region's residents rather than its land.

A region that no source reaches gets NaN (a missing label), never a zero; each region's coverage (the share of
its area, or of its weight, that sources with a value reach) is returned beside the values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from urbanprofile.data.io import first_line
from urbanprofile.errors import DataError, require

if TYPE_CHECKING:
    import geopandas as gpd

#: Vector formats an indicator layer may come in (CSV: a WKT ``geometry`` column, or ``key`` rows).
VECTOR_SUFFIXES = (".gpkg", ".geojson", ".json", ".shp", ".parquet", ".geoparquet", ".fgb")
RASTER_SUFFIXES = (".tif", ".tiff")


@dataclass
class Attached:
    """Indicators on a dataset's regions.

    Attributes:
        values: One column per indicator, indexed by ``region_id`` in the dataset's order; NaN = not reached.
        coverage: Per region, the share of its area (area-weighted) or weight (dasymetric) that the sources reach.
        method: ``area-weighted``, ``dasymetric`` or ``key``.
        notes: One line each, for the user and the dataset's notes.
    """

    values: pd.DataFrame
    coverage: pd.Series
    method: str
    notes: list[str] = field(default_factory=list)


def _feature(frame: pd.DataFrame, position: int, id_column: str | None) -> str:
    if id_column and id_column in frame.columns:
        return f"feature {frame[id_column].iloc[position]!r}"
    return f"feature {position}"


def read_indicator_layer(path: str | Path, crs: str | None = None, key: str | None = None) -> pd.DataFrame:
    """Read an indicator table: polygons with values (GeoPackage, GeoJSON, GeoParquet, shapefile, CSV with a WKT
    ``geometry`` column), or with ``key`` a plain table keyed by region id.

    Raises:
        DataError: Missing or unreadable file, no CRS (and none given), or a CSV with neither geometry nor key.
    """
    gpd = require("geopandas", "build")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            table = pd.read_csv(path)
        elif suffix in (".parquet", ".geoparquet"):
            try:
                table = gpd.read_parquet(path)
            except ValueError:  # a plain parquet table (no geo metadata)
                table = pd.read_parquet(path)
        elif suffix in VECTOR_SUFFIXES:
            table = gpd.read_file(path)
        else:
            raise DataError(f"{path}: unknown indicator format {suffix!r} (use .gpkg, .geojson, .parquet, .csv, .shp)")
    except DataError:
        raise
    except Exception as err:  # readers raise many kinds of errors on a corrupt file
        raise DataError(f"{path}: not a readable indicator file ({first_line(err)})") from None
    if key is not None:
        if key not in table.columns:
            raise DataError(f"{path}: no key column {key!r}; columns: {', '.join(map(str, table.columns))}")
        return pd.DataFrame(table.drop(columns=[c for c in ("geometry",) if c in table.columns]))
    if not isinstance(table, gpd.GeoDataFrame):
        if "geometry" not in table.columns:
            raise DataError(f"{path}: no geometry column and no --key: cannot place its rows on regions")
        try:
            geometry = gpd.GeoSeries.from_wkt(table["geometry"].astype(str))
        except Exception as err:
            raise DataError(f"{path}: column 'geometry' is not WKT ({first_line(err)})") from None
        table = gpd.GeoDataFrame(table.drop(columns="geometry"), geometry=geometry, crs=None)
    if crs is not None:
        table = table.set_crs(crs, allow_override=True)
    if table.crs is None:
        raise DataError(f"{path}: the indicator layer has no CRS; give one (--crs EPSG:xxxx) or store it in the file")
    return table


def check_columns(table: pd.DataFrame, columns: list[str], source: str, id_column: str | None = None,
                  extensive: bool = False) -> None:
    """Every column exists and is numeric; extensive ones hold no negative value.

    Raises:
        DataError: Naming the column, and the first offending feature.
    """
    for column in columns:
        if column not in table.columns:
            have = ", ".join(str(c) for c in table.columns if c != "geometry")
            raise DataError(f"{source}: no column {column!r}; columns: {have}")
        values = table[column]
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            numbers = pd.to_numeric(values, errors="coerce")
            bad = int(np.argmax(numbers.isna() & values.notna())) if (numbers.isna() & values.notna()).any() else 0
            raise DataError(f"{source}: column {column!r} is not numeric ({values.iloc[bad]!r} in "
                            f"{_feature(table, bad, id_column)})")
        finite = values.to_numpy(dtype=float)
        if np.isinf(finite).any():
            bad = int(np.argmax(np.isinf(finite)))
            raise DataError(f"{source}: column {column!r} holds infinity ({_feature(table, bad, id_column)})")
        if extensive and (finite < 0).any():
            bad = int(np.argmax(finite < 0))
            raise DataError(f"{source}: extensive column {column!r} is negative ({finite[bad]:g} in "
                            f"{_feature(table, bad, id_column)}); only non-negative counts can be split over areas")


def _check_geometry(table: gpd.GeoDataFrame, source: str, id_column: str | None) -> None:
    geometry = table.geometry
    empty = geometry.isna() | geometry.is_empty
    if empty.any():
        bad = int(np.argmax(empty.to_numpy()))
        raise DataError(f"{source}: {_feature(table, bad, id_column)} has no geometry")
    polygonal = geometry.geom_type.isin(["Polygon", "MultiPolygon"])
    if not polygonal.all():
        bad = int(np.argmax(~polygonal.to_numpy()))
        raise DataError(f"{source}: {_feature(table, bad, id_column)} is a {geometry.iloc[bad].geom_type}; "
                        "indicator features must be polygons")
    valid = geometry.is_valid
    if not valid.all():
        from shapely.validation import explain_validity

        bad = int(np.argmax(~valid.to_numpy()))
        raise DataError(f"{source}: {_feature(table, bad, id_column)} has an invalid polygon "
                        f"({explain_validity(geometry.iloc[bad])}); repair it (e.g. shapely make_valid)")


def read_weights(spec: str, crs: str | None = None) -> gpd.GeoDataFrame:
    """Read a weights layer ``PATH:COLUMN`` as points with a ``weight`` column.

    Points come from a vector file or a CSV with ``longitude``/``latitude`` (or ``lon``/``lat``) columns in
    EPSG:4326 (or ``crs``); a GeoTIFF gives one point per cell centre with its value (COLUMN = band, default 1).

    Raises:
        DataError: A missing file or column, a non-numeric or negative weight, no CRS.
    """
    gpd = require("geopandas", "build")
    path_text, sep, column = spec.rpartition(":")
    if not sep or not path_text:
        path_text, column = spec, ""
    path = Path(path_text)
    if not path.is_file():
        raise DataError(f"{path}: weights file not found (expected --weights PATH:COLUMN)")
    suffix = path.suffix.lower()
    if suffix in RASTER_SUFFIXES:
        rasterio = require("rasterio", "multimodal")
        band = int(column) if column.isdigit() else 1
        try:
            with rasterio.open(path) as raster:
                values = raster.read(band, masked=True).astype(float)
                rows, cols = np.nonzero(~np.ma.getmaskarray(values) & (values.filled(0) > 0))
                xs, ys = rasterio.transform.xy(raster.transform, rows, cols)
                raster_crs = raster.crs
        except Exception as err:
            raise DataError(f"{path}: not a readable raster band {band} ({first_line(err)})") from None
        if raster_crs is None and crs is None:
            raise DataError(f"{path}: the weights raster has no CRS")
        return gpd.GeoDataFrame({"weight": values.filled(0)[rows, cols]},
                                geometry=gpd.points_from_xy(xs, ys), crs=raster_crs or crs)
    if not column:
        raise DataError(f"{path}: name the weight column (--weights {path}:COLUMN)")
    if suffix == ".csv":
        header = pd.read_csv(path, nrows=0).columns
        lon = next((c for c in ("longitude", "lon", "x") if c in header), None)
        lat = next((c for c in ("latitude", "lat", "y") if c in header), None)
        if lon is None or lat is None:
            raise DataError(f"{path}: no longitude/latitude (or lon/lat) columns for the weight points")
        if column not in header:
            raise DataError(f"{path}: no weight column {column!r}; columns: {', '.join(header)}")
        table = pd.read_csv(path, usecols=[lon, lat, column])
        table = table.dropna(subset=[lon, lat])
        points = gpd.GeoDataFrame({column: table[column].to_numpy()},
                                  geometry=gpd.points_from_xy(table[lon], table[lat]), crs=crs or "EPSG:4326")
    else:
        points = read_indicator_layer(path, crs)
        assert isinstance(points, gpd.GeoDataFrame)
    check_columns(points, [column], str(path), extensive=True)
    points = points[points[column].fillna(0) > 0]
    return gpd.GeoDataFrame({"weight": points[column].to_numpy(dtype=float)}, geometry=points.geometry.to_numpy(),
                            crs=points.crs)


def _working_crs(regions: gpd.GeoDataFrame) -> Any:
    """A metric CRS for areas: the regions' local UTM zone."""
    return regions.estimate_utm_crs()


def interpolate(
    regions: gpd.GeoDataFrame,
    source: gpd.GeoDataFrame,
    extensive: list[str],
    intensive: list[str],
    weights: gpd.GeoDataFrame | None = None,
    source_name: str = "indicators",
    id_column: str | None = None,
) -> Attached:
    """Interpolate indicator columns from source polygons onto regions (area-weighted, or dasymetric by weights).

    Args:
        regions: The dataset's regions (polygons, indexed by ``region_id``, any CRS).
        source: Indicator polygons with the columns (any CRS; reprojected).
        extensive: Counts, split over regions.
        intensive: Rates or medians, averaged with area (or weight) as the weights.
        weights: Points with a ``weight`` column (see :func:`read_weights`), for dasymetric interpolation.
        source_name: Named in errors.
        id_column: A source column that names features in errors.

    Raises:
        DataError: A bad column or geometry, regions without polygons, weights outside every region, or sources
            that reach no region.
    """
    gpd = require("geopandas", "build")
    tobler = require("tobler.area_weighted", "indicators")
    if not set(extensive).isdisjoint(intensive):
        both = sorted(set(extensive) & set(intensive))[0]
        raise DataError(f"{source_name}: column {both!r} is given as both extensive and intensive")
    if not extensive and not intensive:
        raise DataError(f"{source_name}: name at least one --extensive or --intensive column")
    check_columns(source, extensive, source_name, id_column, extensive=True)
    check_columns(source, intensive, source_name, id_column)
    _check_geometry(source, source_name, id_column)
    polygonal = regions.geometry.notna() & regions.geometry.geom_type.isin(["Polygon", "MultiPolygon"])
    if not polygonal.all():
        raise DataError(f"region {str(regions.index[int(np.argmax(~polygonal.to_numpy()))])!r} has no polygon: "
                        "areal interpolation needs region polygons")
    crs = _working_crs(regions)
    targets = gpd.GeoDataFrame(geometry=regions.geometry.to_crs(crs).make_valid().to_numpy(), crs=crs)
    sources = gpd.GeoDataFrame(source[[*extensive, *intensive]].reset_index(drop=True),
                               geometry=source.geometry.to_crs(crs).to_numpy(), crs=crs)
    region_area = targets.area.to_numpy()
    notes: list[str] = []
    if weights is None:
        method = "area-weighted"
        pieces = gpd.overlay(sources.assign(_s=np.arange(len(sources)))[["_s", "geometry"]],
                             targets.assign(_t=np.arange(len(targets)))[["_t", "geometry"]], how="intersection",
                             keep_geom_type=True)
        amount = pieces.area.to_numpy()
        source_total = sources.area.to_numpy()
        region_total = region_area
    else:
        method = "dasymetric"
        points = weights.to_crs(crs)
        in_region = gpd.sjoin(points, targets.assign(_t=np.arange(len(targets)))[["_t", "geometry"]],
                              how="left", predicate="within")
        in_region = in_region[~in_region.index.duplicated()]
        if in_region["_t"].isna().all():
            raise DataError(f"weights: none of the {len(points)} weight points falls inside a region "
                            "(are they in the right CRS and the right city?)")
        in_source = gpd.sjoin(points, sources.assign(_s=np.arange(len(sources)))[["_s", "geometry"]],
                              how="left", predicate="within")
        in_source = in_source[~in_source.index.duplicated()]
        joined = pd.DataFrame({"weight": points["weight"].to_numpy(), "_t": in_region["_t"].to_numpy(),
                               "_s": in_source["_s"].to_numpy()})
        region_total = joined.dropna(subset=["_t"]).groupby("_t")["weight"].sum().reindex(
            np.arange(len(targets)), fill_value=0.0).to_numpy()
        source_total = joined.dropna(subset=["_s"]).groupby("_s")["weight"].sum().reindex(
            np.arange(len(sources)), fill_value=0.0).to_numpy()
        pieces_frame = joined.dropna(subset=["_s", "_t"]).groupby(["_s", "_t"])["weight"].sum().reset_index()
        pieces = pieces_frame
        amount = pieces_frame["weight"].to_numpy()
        empty_sources = [i for i in range(len(sources)) if source_total[i] == 0 and
                         any(sources[c].iloc[i] > 0 for c in extensive)]
        if empty_sources:
            notes.append(f"{len(empty_sources)} source features with counts hold no weight points; their counts "
                         f"are not placed (first: {_feature(source, empty_sources[0], id_column)})")
    from scipy.sparse import coo_matrix

    s_index = pieces["_s"].to_numpy(dtype=int)
    t_index = pieces["_t"].to_numpy(dtype=int)
    # One extra target column holds each source's area (weight) outside every region: tobler then splits a
    # source's count over its whole extent, so a source half outside the regions gives them half its count.
    reached = np.bincount(s_index, weights=amount, minlength=len(sources))
    outside = np.clip(source_total - reached, 0.0, None)
    n_targets = len(targets)
    table_rows = np.concatenate([s_index, np.arange(len(sources))])
    table_cols = np.concatenate([t_index, np.full(len(sources), n_targets)])
    table_vals = np.concatenate([amount, outside])
    values = pd.DataFrame(index=regions.index)
    padded = gpd.GeoDataFrame(geometry=[*targets.geometry, targets.geometry.iloc[0]], crs=crs)
    for column in [*extensive, *intensive]:
        known = sources[column].notna().to_numpy()
        keep = known[table_rows]
        table = coo_matrix((table_vals[keep], (table_rows[keep], table_cols[keep])),
                           shape=(len(sources), n_targets + 1)).tocsr()
        kind = {"extensive_variables": [column]} if column in extensive else {"intensive_variables": [column]}
        # Unknown values carry no weight (their table rows are dropped); they are zeroed here because tobler's own
        # NaN fill writes into a read-only array under pandas' copy-on-write.
        filled = gpd.GeoDataFrame({column: sources[column].fillna(0.0).to_numpy(dtype=float)},
                                  geometry=sources.geometry, crs=crs)
        estimate = tobler.area_interpolate(filled, padded, table=table, allocate_total=True, **kind)
        result = np.array(estimate[column].to_numpy(dtype=float)[:n_targets])
        reached_by_known = np.bincount(t_index[known[s_index]], weights=amount[known[s_index]], minlength=n_targets)
        result[reached_by_known <= 0] = np.nan  # no source with a value reaches it: missing, never zero
        if column in extensive and weights is not None:
            # A region that sources reach but that holds no weight (no residents): a true zero count.
            area_reached = _area_reached(sources[known], targets)
            result[(reached_by_known <= 0) & area_reached] = 0.0
        values[column] = result
    reached_region = np.bincount(t_index, weights=amount, minlength=n_targets)
    with np.errstate(invalid="ignore", divide="ignore"):
        coverage = np.where(region_total > 0, np.clip(reached_region / region_total, 0, 1), 0.0)
    coverage_series = pd.Series(coverage, index=regions.index, name="coverage")
    uncovered = int((coverage == 0).sum())
    if uncovered and weights is None:
        notes.append(f"{uncovered} of {len(regions)} regions are not reached by {source_name} "
                     "(their labels are missing, not zero)")
    elif uncovered:
        notes.append(f"{uncovered} of {len(regions)} regions hold no weight reached by {source_name}: their "
                     "intensive labels are missing; their counts are 0 where sources cover them, else missing")
    return Attached(values, coverage_series, method, notes)


def _area_reached(sources: gpd.GeoDataFrame, targets: gpd.GeoDataFrame) -> np.ndarray:
    """Whether each target overlaps some source polygon by area."""
    union = sources.geometry.union_all()
    return np.asarray(targets.geometry.intersection(union).area > 1e-9 * targets.geometry.area)


def attach_by_key(regions: pd.Index, table: pd.DataFrame, key: str, columns: list[str], source_name: str,
                  dataset: str) -> Attached:
    """Indicators already per region: rows matched to regions by ``key`` (ids compared as text).

    Raises:
        DataError: A key that matches no region, a duplicated key, or a non-numeric column.
    """
    check_columns(table, columns, source_name, key)
    keys = table[key].astype(str)
    ids = pd.Index(regions.map(str))
    unknown = ~keys.isin(ids)
    if unknown.any():
        raise DataError(f"{source_name}: key {keys[unknown].iloc[0]!r} (column {key!r}) matches no region of "
                        f"{dataset!r} ({int(unknown.sum())} such rows)")
    if keys.duplicated().any():
        raise DataError(f"{source_name}: key {keys[keys.duplicated()].iloc[0]!r} appears more than once")
    frame = table.assign(_id=keys).set_index("_id")[columns].reindex(ids)
    frame.index = regions
    coverage = pd.Series(frame.notna().any(axis=1).astype(float).to_numpy(), index=regions, name="coverage")
    notes = [f"{int((coverage == 0).sum())} regions have no row in {source_name}"] if (coverage == 0).any() else []
    return Attached(frame.astype(float), coverage, "key", notes)
