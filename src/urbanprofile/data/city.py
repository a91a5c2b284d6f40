"""The city data model: regions, named views keyed by ``region_id``, targets and metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from urbanprofile.errors import DataError, MethodUnavailableError

if TYPE_CHECKING:
    import geopandas as gpd

#: Views holding non-negative counts (validated as such).
COUNT_VIEWS = ("poi_counts", "landuse_counts", "od_flows", "od_target", "od_patterns")
#: Views that are square region x region matrices (columns are region ids too).
SQUARE_VIEWS = ("od_flows", "od_target", "poi_similarity", "landuse_similarity")


@dataclass
class CityData:
    """One city: its regions, the views that describe them, and the indicators to predict.

    Attributes:
        name: Dataset name, e.g. ``hafusion-nyc``.
        regions: GeoDataFrame indexed by ``region_id`` in EPSG:4326. ``geometry`` may hold polygons,
            centroid points or be empty; columns ``lon``/``lat`` hold centroids when locations are known.
            Extra per-region attributes (e.g. ``landuse_district``) are further columns.
        views: Named DataFrames indexed by ``region_id`` in the same order as ``regions``:
            ``poi_counts`` (regions x POI categories), ``landuse_counts`` (regions x land-use classes),
            ``od_flows`` (square origin x destination trip counts), ``od_target`` (the OD matrix the peers
            reconstruct), ``poi_similarity``/``landuse_similarity`` (square), ``od_patterns``
            (regions x (pattern, destination) trip counts).
        targets: One column per indicator, indexed by ``region_id``; NaN marks a missing label.
        neighbors: Region adjacency (``region_id`` -> adjacent ids) when known, e.g. shared borders.
        meta: Source, units, notes on quirks, protocol settings.
        modalities: Non-numeric inputs for the pretrained modality encoders, one long table per modality
            with one row per item and a ``region_id`` column (a region may have none, one or many items):
            ``tile_caption``/``geo_text`` (``text``), ``tile_image`` (``image`` path), ``streetview_caption``
            (``text``, ``item``, ``lon``, ``lat``), ``streetview_image`` (``image``, ``lon``, ``lat``),
            ``region_image`` (``raster`` path: one image cut per region).
            See :mod:`urbanprofile.data.loaders.multimodal`.
    """

    name: str
    regions: gpd.GeoDataFrame
    views: dict[str, pd.DataFrame] = field(default_factory=dict)
    targets: pd.DataFrame = field(default_factory=pd.DataFrame)
    neighbors: dict[Any, list[Any]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    modalities: dict[str, pd.DataFrame] = field(default_factory=dict)
    #: Derived, label-free structures (spatial blocks, adjacency) computed once per city.
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    # -- convenience -------------------------------------------------------------------------------
    @property
    def n_regions(self) -> int:
        return len(self.regions)

    @property
    def region_ids(self) -> pd.Index:
        return self.regions.index

    @property
    def has_locations(self) -> bool:
        return {"lon", "lat"} <= set(self.regions.columns) and bool(
            np.isfinite(self.regions[["lon", "lat"]].to_numpy(dtype=float)).all()
        )

    @property
    def tasks(self) -> list[str]:
        return list(self.targets.columns)

    def view(self, name: str) -> pd.DataFrame:
        """Return a view, or raise a one-line error naming the views this city has."""
        if name not in self.views:
            have = ", ".join(sorted(self.views)) or "none"
            raise MethodUnavailableError(f"dataset {self.name!r} has no {name!r} view (it has: {have})")
        return self.views[name]

    def coordinates(self) -> np.ndarray:
        """Centroids as an (N, 2) array of (lon, lat) degrees."""
        if not self.has_locations:
            raise MethodUnavailableError(f"dataset {self.name!r} has no region locations (lon/lat centroids)")
        return self.regions[["lon", "lat"]].to_numpy(dtype=float)

    def coordinates_km(self) -> np.ndarray:
        """Centroids projected to a local plane in kilometres (equirectangular about the city's mean)."""
        lonlat = self.coordinates()
        lat0 = np.deg2rad(lonlat[:, 1].mean())
        km_per_deg = 111.32
        x = (lonlat[:, 0] - lonlat[:, 0].mean()) * km_per_deg * np.cos(lat0)
        y = (lonlat[:, 1] - lonlat[:, 1].mean()) * km_per_deg
        return np.column_stack([x, y])

    def od_patterns(self) -> np.ndarray:
        """The time-pattern OD tensor (P, N, N) from the ``od_patterns`` view."""
        flat = self.view("od_patterns").to_numpy()
        n = self.n_regions
        return flat.reshape(n, -1, n).transpose(1, 0, 2)

    def subset(self, region_ids: pd.Index | list[Any]) -> CityData:
        """A new city restricted to some regions (square views are restricted on both axes)."""
        ids = pd.Index(region_ids)
        views = {}
        for name, frame in self.views.items():
            sub = frame.loc[ids]
            if name in SQUARE_VIEWS:
                sub = sub.loc[:, ids]
            views[name] = sub
        neighbors = None
        if self.neighbors is not None:
            keep = set(ids)
            neighbors = {r: [n for n in self.neighbors.get(r, []) if n in keep] for r in ids}
        return CityData(
            name=self.name,
            regions=self.regions.loc[ids],
            views=views,
            targets=self.targets.loc[ids],
            neighbors=neighbors,
            meta=dict(self.meta),
            modalities={k: t[t["region_id"].isin(ids)].reset_index(drop=True) for k, t in self.modalities.items()},
        )

    def summary(self) -> dict[str, Any]:
        """Counts and label statistics, as shown by ``urbanprofile datasets info``."""
        labels = {}
        for task in self.targets.columns:
            col = self.targets[task]
            valid = col.dropna()
            labels[task] = {
                "n": int(valid.size),
                "missing": int(col.isna().sum()),
                "zeros": int((valid == 0).sum()),
                "mean": float(valid.mean()) if valid.size else float("nan"),
                "std": float(valid.std()) if valid.size > 1 else float("nan"),
                "min": float(valid.min()) if valid.size else float("nan"),
                "max": float(valid.max()) if valid.size else float("nan"),
            }
        return {
            "name": self.name,
            "n_regions": self.n_regions,
            "has_locations": self.has_locations,
            "has_geometry": bool(self.regions.geometry.notna().any()) if "geometry" in self.regions else False,
            "views": {k: list(v.shape) for k, v in self.views.items()},
            "modalities": {k: {"items": len(t), "regions": int(t["region_id"].nunique())}
                           for k, t in self.modalities.items()},
            "tasks": labels,
            "meta": {k: v for k, v in self.meta.items() if isinstance(v, str | int | float | list)},
        }

    # -- validation --------------------------------------------------------------------------------
    def validate(self) -> CityData:
        """Check every invariant; raise :class:`DataError` naming the first broken one."""
        where = self.meta.get("source", self.name)
        ids = self.regions.index
        if ids.name != "region_id":
            raise DataError(f"{where}: regions must be indexed by 'region_id' (index is named {ids.name!r})")
        if ids.has_duplicates:
            dup = ids[ids.duplicated()][:3].tolist()
            raise DataError(f"{where}: duplicate region_id values {dup}")
        if self.n_regions == 0:
            raise DataError(f"{where}: no regions")
        crs = getattr(self.regions, "crs", None)
        has_geom = "geometry" in self.regions and self.regions.geometry.notna().any()
        if has_geom:
            if crs is None:
                raise DataError(f"{where}: region geometry has no CRS")
            if not crs.equals("EPSG:4326"):
                raise DataError(f"{where}: regions must be in EPSG:4326, got {crs.to_string()}")
            geoms = self.regions.geometry
            bad = geoms.notna() & ~geoms.is_valid
            if bad.any():
                raise DataError(f"{where}: invalid geometry for region {bad[bad].index[0]}")
        if {"lon", "lat"} <= set(self.regions.columns):
            lonlat = self.regions[["lon", "lat"]].to_numpy(dtype=float)
            finite = np.isfinite(lonlat)
            if finite.any() and not finite.all():
                row = int(np.where(~finite.all(axis=1))[0][0])
                raise DataError(f"{where}: region {ids[row]} has a non-finite centroid")
            if finite.all() and (np.abs(lonlat[:, 0]).max() > 180 or np.abs(lonlat[:, 1]).max() > 90):
                raise DataError(f"{where}: centroids are not lon/lat degrees (values out of range)")
        for name, frame in self.views.items():
            _validate_view(where, name, frame, ids)
        if len(self.targets.columns):
            if not self.targets.index.equals(ids):
                raise DataError(f"{where}: targets are not indexed by the same region_id as the regions")
            values = self.targets.to_numpy(dtype=float)
            if np.isinf(values).any():
                task = self.targets.columns[np.isinf(values).any(axis=0)][0]
                raise DataError(f"{where}: target {task!r} has infinite values")
        for name, table in self.modalities.items():
            if "region_id" not in table.columns:
                raise DataError(f"{where}: modality {name!r} has no 'region_id' column")
            stray = ~table["region_id"].isin(ids)
            if stray.any():
                first = table["region_id"][stray].iloc[0]
                raise DataError(f"{where}: modality {name!r} names unknown region {first}")
        if self.neighbors is not None:
            known = set(ids)
            for region, adjacent in self.neighbors.items():
                if region not in known:
                    raise DataError(f"{where}: neighbors name unknown region {region}")
                unknown = [a for a in adjacent if a not in known]
                if unknown:
                    raise DataError(f"{where}: neighbors of region {region} name unknown region {unknown[0]}")
        return self


def _validate_view(where: str, name: str, frame: pd.DataFrame, ids: pd.Index) -> None:
    if len(frame) != len(ids):
        raise DataError(
            f"{where}: view {name!r} has {len(frame)} regions but the dataset has {len(ids)}"
        )
    if not frame.index.equals(ids):
        raise DataError(f"{where}: view {name!r} is not indexed by the dataset's region_id in the same order")
    if name in SQUARE_VIEWS and frame.shape[0] != frame.shape[1]:
        raise DataError(f"{where}: view {name!r} must be square (regions x regions), got shape {frame.shape}")
    if is_sparse_view(frame):
        # Check the stored entries only: a large sparse OD matrix is never densified.
        coo = frame.sparse.to_coo()  # type: ignore[attr-defined]
        values = coo.data.astype(float)

        def region(entry: int) -> Any:
            return ids[coo.row[entry]]
    else:
        values = frame.to_numpy(dtype=float).ravel()
        width = max(frame.shape[1], 1)

        def region(entry: int) -> Any:
            return ids[entry // width]
    bad = ~np.isfinite(values)
    if bad.any():
        raise DataError(f"{where}: view {name!r} has NaN or infinite values (region {region(int(np.argmax(bad)))})")
    negative = values < 0
    if name in COUNT_VIEWS and negative.any():
        raise DataError(f"{where}: view {name!r} has negative counts (region {region(int(np.argmax(negative)))})")


def is_sparse_view(frame: pd.DataFrame) -> bool:
    """Whether a view is stored sparse (pandas ``SparseDtype`` columns, e.g. the OD matrix of a large city)."""
    return frame.shape[1] > 0 and all(isinstance(dtype, pd.SparseDtype) for dtype in frame.dtypes)


#: Cities with more regions than this keep square views (the OD matrix) sparse in memory.
SPARSE_VIEW_ABOVE = 3000


def sparse_square_view(matrix: Any, ids: pd.Index) -> pd.DataFrame:
    """Wrap a SciPy sparse (N, N) matrix as a sparse view indexed by ``region_id`` on both axes."""
    frame = pd.DataFrame.sparse.from_spmatrix(matrix, index=ids, columns=ids)  # type: ignore[attr-defined]
    frame.index.name = "region_id"
    return frame


def view_csr(frame: pd.DataFrame) -> Any:
    """A view as a SciPy CSR matrix, without densifying a sparse view."""
    from scipy import sparse

    if is_sparse_view(frame):
        return frame.sparse.to_coo().tocsr().astype(float)  # type: ignore[attr-defined]
    return sparse.csr_matrix(frame.to_numpy(dtype=float))


def frame_from_array(array: np.ndarray, ids: pd.Index, columns: list[Any] | pd.Index | None = None) -> pd.DataFrame:
    """Wrap a 2-D array as a view DataFrame indexed by ``region_id``."""
    frame = pd.DataFrame(array, index=ids, columns=columns)
    frame.index.name = "region_id"
    return frame
