"""PCA baseline: principal components of the log-standardised raw views."""

from __future__ import annotations

import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.data.features import ALL_VIEWS, LogScaler, stacked_views
from urbanprofile.embedders.base import Embedder, as_embedding


class PCAEmbedder(Embedder):
    """Project log1p-standardised stacked views on their leading principal components.

    Args:
        n_components: Embedding size (capped at ``n_regions - 1``).
        views: Views to stack.
    """

    def __init__(
        self, n_components: int = 32, views: tuple[str, ...] = ALL_VIEWS, random_state: int | None = 0
    ) -> None:
        self.n_components = n_components
        self.views = views
        self.random_state = random_state

    @property
    def required_views(self) -> tuple[str, ...]:
        return tuple(self.views)

    def fit(self, city: CityData) -> PCAEmbedder:
        from sklearn.decomposition import PCA

        if self.n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {self.n_components}")
        raw = stacked_views(city, tuple(self.views))
        self.scaler_ = LogScaler().fit(raw)
        features = self.scaler_.transform(raw)
        n = min(self.n_components, features.shape[0] - 1, features.shape[1])
        self.pca_ = PCA(n_components=n, svd_solver="full", random_state=self.random_state).fit(features)
        return self

    def transform(self, city: CityData) -> pd.DataFrame:
        self._check_fitted("pca_")
        features = self.scaler_.transform(stacked_views(city, tuple(self.views)))
        return as_embedding(self.pca_.transform(features), city.region_ids)
