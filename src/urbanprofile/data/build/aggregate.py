"""Views aggregated per region: POI counts per category and land-use shares."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from urbanprofile.data.build.join import assign_points, check_points_inside
from urbanprofile.data.build.messages import listed
from urbanprofile.data.build.osm import is_osm_extract, read_osm_landuse
from urbanprofile.data.build.regions import polygonal_part
from urbanprofile.data.build.spec import OTHER, BuildReport
from urbanprofile.data.city import frame_from_array
from urbanprofile.data.io import read_vector
from urbanprofile.errors import DataError

if TYPE_CHECKING:
    import geopandas as gpd


def map_categories(
    raw: pd.Series, categories: list[str] | dict[str, list[str]] | None, weights: np.ndarray | None = None,
) -> tuple[np.ndarray, list[str], dict[str, int]]:
    """Map raw category values onto a category list; anything else counts as ``other``.

    Args:
        raw: Raw values (e.g. ``restaurant`` or, for OSM, ``amenity=restaurant``).
        categories: ``None`` (every value found is a category), a list of categories, or a mapping
            ``{category: [raw values]}`` where ``key=*`` matches any ``key=value``.
        weights: How many points each value stands for (a streamed build maps each distinct value once, in the
            order values first appear in the file); ``None``: one each.

    Returns:
        Category codes per point, the category names (``other`` last), and unknown raw values with counts
        (most frequent first; missing values as ``<missing>``).
    """
    values = raw.astype("string")
    if categories is None:
        names = sorted(str(v) for v in values.dropna().unique())
        mapped = values
    elif isinstance(categories, dict):
        names = [str(k) for k in categories]
        exact = {str(v): str(k) for k, vs in categories.items() for v in vs if not str(v).endswith("=*")}
        exact.update({n: n for n in names})
        wildcard = {str(v)[:-2]: str(k) for k, vs in categories.items() for v in vs if str(v).endswith("=*")}
        mapped = values.map(exact)
        key = values.str.split("=", n=1).str[0]
        mapped = mapped.fillna(key.map(wildcard))
    else:
        names = [str(c) for c in categories]
        mapped = values.where(values.isin(names))
    unknown = mapped.isna()
    if weights is None:
        counts = values[unknown].fillna("<missing>").value_counts()
    else:  # the same order as value_counts: most frequent first, ties in order of first appearance
        counts = pd.Series(np.asarray(weights)[unknown.to_numpy()], index=values[unknown].fillna("<missing>"))
        counts = counts.groupby(level=0, sort=False).sum().sort_values(ascending=False, kind="stable")
    all_names = [*(n for n in names if n != OTHER), OTHER]
    codes = pd.Categorical(mapped.fillna(OTHER).astype(str), categories=all_names).codes
    return np.asarray(codes), all_names, {str(k): int(v) for k, v in counts.items()}


def poi_counts(
    points: pd.DataFrame, regions: gpd.GeoDataFrame, category_column: str,
    categories: list[str] | dict[str, list[str]] | None, engine: str, report: BuildReport, where: str = "POIs",
    swap_hint: str = "",
) -> pd.DataFrame:
    """Count POIs per region and category (the ``poi_counts`` view); fills the POI figures of ``report``.

    Raises:
        DataError: No POI lies inside a region, or the coordinates look swapped (see :func:`check_points_inside`).
    """
    if category_column not in points.columns:
        raise DataError(f"{where}: no column {category_column!r} for POI categories "
                        f"(columns: {listed(c for c in points.columns if c not in ('lon', 'lat'))})")
    codes, names, unknown = map_categories(points[category_column], categories)
    lon, lat = points["lon"].to_numpy(float), points["lat"].to_numpy(float)
    position = assign_points(lon, lat, regions, engine)
    check_points_inside(lon, lat, position, regions, engine, where, "POIs", swap_hint)
    inside = position >= 0
    counts = np.zeros((len(regions), len(names)), dtype=np.int64)
    np.add.at(counts, (position[inside], codes[inside]), 1)
    record_poi_figures(report, len(points), int(inside.sum()), unknown, names)
    return frame_from_array(counts, regions.index, names)


def record_poi_figures(report: BuildReport, n_points: int, n_inside: int, unknown: dict[str, int],
                       names: list[str]) -> None:
    """Fill the POI figures of ``report`` from a join's totals (one place for every join that counts POIs).

    Args:
        report: Where the figures go.
        n_points: POIs with a location that were joined.
        n_inside: Those inside a region.
        unknown: Unknown raw category values with counts, most frequent first (from :func:`map_categories`).
        names: The categories of the view.
    """
    report.n_pois_read += n_points
    report.n_pois_joined = n_inside
    report.n_pois_outside = n_points - n_inside
    report.n_pois_unknown_category = int(sum(unknown.values()))
    report.unknown_categories = dict(list(unknown.items())[:20])
    report.n_categories = len(names)


def landuse_shares(
    regions: gpd.GeoDataFrame, landuse: gpd.GeoDataFrame, class_column: str, utm: Any = None,
) -> pd.DataFrame:
    """Share of each region's area covered by each land-use class (overlay in the local UTM zone).

    ``utm`` fixes the projected CRS (default: the regions' UTM zone), so that a part of the regions (a partition of
    a distributed build) gives the shares the whole city gives.
    """
    import geopandas as gpd

    utm = regions.estimate_utm_crs() if utm is None else utm
    cells = gpd.GeoDataFrame({"position": np.arange(len(regions))}, geometry=regions.geometry.to_numpy(),
                             crs="EPSG:4326").to_crs(utm)
    parcels = landuse[[class_column, landuse.geometry.name]].to_crs(utm)
    parcels = parcels.assign(**{class_column: parcels[class_column].astype(str)})
    pieces = gpd.overlay(cells, parcels, how="intersection", keep_geom_type=True)
    classes = sorted(parcels[class_column].unique())
    area = pd.DataFrame({"position": pieces["position"], "cls": pieces[class_column], "area": pieces.area})
    table = area.pivot_table(index="position", columns="cls", values="area", aggfunc="sum", fill_value=0.0)
    table = table.reindex(index=range(len(regions)), columns=classes, fill_value=0.0)
    shares = table.to_numpy() / cells.area.to_numpy()[:, None]
    return frame_from_array(np.clip(shares, 0.0, None), regions.index, classes)


def read_landuse(
    path: Path, class_column: str, crs: str | None, report: BuildReport | None = None
) -> gpd.GeoDataFrame:
    """Land-use polygons with a class field, repaired when invalid.

    An ``.osm.pbf`` extract's tags are cleaned into the classes of
    :data:`urbanprofile.data.build.osm.OSM_LANDUSE_CLASSES`; the tags dropped are counted in ``report``.
    """
    if is_osm_extract(path):
        landuse, dropped = read_osm_landuse(path)
        if report is not None:
            report.n_landuse_dropped = sum(dropped.values())
            report.landuse_dropped = dict(list(dropped.items())[:20])
        return landuse.rename(columns={"class": class_column})
    frame = read_vector(path, crs)
    if class_column not in frame.columns:
        raise DataError(f"{path}: no field {class_column!r} for land-use classes (fields: {listed(frame.columns)})")
    frame = frame[frame.geometry.notna() & frame.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]
    if frame.empty:
        raise DataError(f"{path}: holds no land-use polygons")
    invalid = ~frame.geometry.is_valid
    if invalid.any():
        frame = frame.assign(geometry=frame.geometry.make_valid().map(polygonal_part)).dropna(subset=["geometry"])
    return frame[frame[class_column].notna()]


