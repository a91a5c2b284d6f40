"""Raw-feature baselines: the views themselves, and coordinates, as embeddings."""

from __future__ import annotations

import numpy as np
import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.data.features import ALL_VIEWS, sinusoidal_location, stacked_views, view_feature_names
from urbanprofile.embedders.base import Embedder, as_embedding


class RawViews(Embedder):
    """Concatenate raw views (counts as they are; ``od_flows`` as out- and in-flow profiles).

    Args:
        views: Views to stack, e.g. ``("poi_counts",)``.
    """

    def __init__(self, views: tuple[str, ...] = ALL_VIEWS, random_state: int | None = None) -> None:
        self.views = views
        self.random_state = random_state

    @property
    def required_views(self) -> tuple[str, ...]:
        return tuple(self.views)

    def fit(self, city: CityData) -> RawViews:
        if not self.views:
            raise ValueError("views must name at least one view")
        for view in self.views:
            city.view(view)
        self.n_features_ = stacked_views(city, tuple(self.views)).shape[1]
        return self

    def transform(self, city: CityData) -> pd.DataFrame:
        """The views side by side, one named column per feature (``poi_<category>``, ``out_<region>``, ...)."""
        self._check_fitted("n_features_")
        views = tuple(self.views)
        return _named(as_embedding(stacked_views(city, views), city.region_ids), view_feature_names(city, views))


class SinusoidalLocation(Embedder):
    """Multi-scale sinusoidal features of region centroids (a location-only baseline).

    Args:
        wavelengths_km: Wavelengths of the sin/cos features; the default spans a block to a city.
    """

    def __init__(
        self,
        wavelengths_km: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0),
        random_state: int | None = None,
    ) -> None:
        self.wavelengths_km = wavelengths_km
        self.random_state = random_state

    def fit(self, city: CityData) -> SinusoidalLocation:
        if not self.wavelengths_km or min(self.wavelengths_km) <= 0:
            raise ValueError(f"wavelengths_km must be positive, got {self.wavelengths_km}")
        self.origin_ = city.coordinates().mean(axis=0)
        return self

    def transform(self, city: CityData) -> pd.DataFrame:
        self._check_fitted("origin_")
        wavelengths = tuple(self.wavelengths_km)
        names = ["x_km", "y_km"] + [f"{f}_{axis}_{w:g}km" for w in wavelengths for f in ("sin", "cos") for axis in "xy"]
        return _named(as_embedding(sinusoidal_location(city.coordinates_km(), wavelengths), city.region_ids), names)


class Coordinates(Embedder):
    """Centroids in local kilometres: the input of the k-nearest-neighbour location baseline."""

    def __init__(self, random_state: int | None = None) -> None:
        self.random_state = random_state

    def fit(self, city: CityData) -> Coordinates:
        self.n_features_ = 2
        city.coordinates()
        return self

    def transform(self, city: CityData) -> pd.DataFrame:
        self._check_fitted("n_features_")
        return _named(as_embedding(np.asarray(city.coordinates_km()), city.region_ids), ["x_km", "y_km"])


def _named(embedding: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Raw features keep what they are as column names (still numeric, still indexed by ``region_id``)."""
    if len(names) != embedding.shape[1]:
        raise ValueError(f"{len(names)} feature names for {embedding.shape[1]} columns")
    embedding.columns = pd.Index(names)
    return embedding
