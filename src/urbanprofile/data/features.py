"""Feature matrices shared by the baselines: stacked raw views and location encodings."""

from __future__ import annotations

import numpy as np

from urbanprofile.data.city import CityData

#: The views stacked by ``raw-all`` (and fed to PCA and the autoencoder).
ALL_VIEWS = ("poi_counts", "landuse_counts", "od_flows")


def mobility_profiles(city: CityData) -> np.ndarray:
    """Out-flow (OD row) and in-flow (OD column) trip counts of every region, side by side."""
    od = city.view("od_flows").to_numpy(dtype=float)
    return np.hstack([od, od.T])


def view_matrix(city: CityData, view: str) -> np.ndarray:
    """One view as a float matrix; ``od_flows`` becomes out- and in-flow profiles."""
    if view == "od_flows":
        return mobility_profiles(city)
    return city.view(view).to_numpy(dtype=float)


def stacked_views(city: CityData, views: tuple[str, ...] = ALL_VIEWS) -> np.ndarray:
    return np.hstack([view_matrix(city, v) for v in views])


#: Short prefixes of the raw features' names (``poi_<category>``, ``landuse_<class>``).
_PREFIXES = {"poi_counts": "poi", "landuse_counts": "landuse"}


def view_feature_names(city: CityData, views: tuple[str, ...] = ALL_VIEWS) -> list[str]:
    """Names of the columns of :func:`stacked_views`: ``poi_<category>``, ``landuse_<class>``,
    ``out_<region>`` / ``in_<region>`` for mobility, ``<view>_<column>`` otherwise; unique, and free of the
    ``__`` that marks modality blocks (a frame with such names would be read as several blocks)."""
    names: list[str] = []
    for view in views:
        columns = [str(c).replace("__", "_") for c in city.view(view).columns]
        if view == "od_flows":
            names += [f"out_{c}" for c in columns] + [f"in_{c}" for c in columns]
            continue
        prefix = _PREFIXES.get(view, view)
        names += [c if c.startswith(f"{prefix}_") else f"{prefix}_{c}" for c in columns]
    if len(set(names)) < len(names):  # names that clash once prefixed: number the features instead
        return [f"feature_{k}" for k in range(len(names))]
    return names


class LogScaler:
    """log1p of counts, then zero mean and unit variance per column, with statistics kept from ``fit``."""

    def fit(self, matrix: np.ndarray) -> LogScaler:
        logged = np.log1p(np.clip(matrix, 0, None))
        self.mean_ = logged.mean(axis=0)
        std = logged.std(axis=0)
        self.scale_ = np.where(std > 0, std, 1.0)  # constant columns stay zero
        return self

    def transform(self, matrix: np.ndarray) -> np.ndarray:
        return (np.log1p(np.clip(matrix, 0, None)) - self.mean_) / self.scale_


def sinusoidal_location(xy_km: np.ndarray, wavelengths_km: tuple[float, ...]) -> np.ndarray:
    """Multi-scale sinusoidal features of planar coordinates (sin and cos per axis and wavelength)."""
    columns = [xy_km]
    for wavelength in wavelengths_km:
        phase = 2 * np.pi * xy_km / wavelength
        columns += [np.sin(phase), np.cos(phase)]
    return np.hstack(columns)
