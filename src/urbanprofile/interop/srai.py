"""urbanprofile's methods callable the srai way: ``fit/transform(regions_gdf, features_gdf, joint_gdf)``.

A srai user drops any registered urbanprofile method into a srai pipeline; the features are counted per
region (as srai's ``CountEmbedder`` does) into a ``poi_counts`` view. This sits above the method registry,
so it lives outside ``embedders/``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.embedders.base import Embedder
from urbanprofile.embedders.srai import srai_city
from urbanprofile.errors import MethodUnavailableError, NotFittedError
from urbanprofile.methods import get_method

if TYPE_CHECKING:
    import geopandas as gpd


class SraiStyleEmbedder:
    """Any urbanprofile method with srai's embedder interface, to drop into a srai pipeline.

    ``fit``/``transform``/``fit_transform`` take srai's ``(regions_gdf, features_gdf, joint_gdf)`` and
    return srai's embedding convention: a DataFrame indexed by ``region_id`` like ``regions_gdf``. The
    features are counted per region into a ``poi_counts`` view (see :func:`srai_counts`); methods that
    read other views see only that one (``pca`` and ``autoencoder`` are given ``views=("poi_counts",)``),
    and region centroids are provided, so location methods work too.

    Args:
        method: A registered method name, e.g. ``pca``.
        random_state: Seed.
        **params: Constructor arguments that override the method's defaults.

    Example:
        >>> emb = SraiStyleEmbedder("pca", n_components=8).fit_transform(regions_gdf, features_gdf, joint_gdf)
    """

    def __init__(self, method: str = "pca", random_state: int | None = 0, **params: Any) -> None:
        self.method = method
        self.random_state = random_state
        self.params = params

    def _build(self, city: CityData) -> Embedder:
        import importlib

        spec = get_method(self.method)
        reason = spec.unavailable_reason(city)
        if reason:
            raise MethodUnavailableError(f"{reason}; srai's frames only give poi_counts (try pca, autoencoder, "
                                         "raw-poi, srai-count, hex2vec)")
        spec = spec.for_city(city)  # a method that reads any of its views reads poi_counts alone here
        module_name, _, class_name = spec.factory.partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        embedder: Embedder = cls(**{**spec.params, **self.params}, random_state=self.random_state)
        return embedder

    def fit(self, regions_gdf: gpd.GeoDataFrame, features_gdf: gpd.GeoDataFrame,
            joint_gdf: pd.DataFrame) -> SraiStyleEmbedder:
        """Count the features per region and fit the method on them (no labels)."""
        city = srai_city(regions_gdf, features_gdf, joint_gdf)
        self.columns_ = list(city.view("poi_counts").columns)
        self.embedder_ = self._build(city).fit(city)
        return self

    def transform(self, regions_gdf: gpd.GeoDataFrame, features_gdf: gpd.GeoDataFrame,
                  joint_gdf: pd.DataFrame) -> pd.DataFrame:
        """Embed every region of ``regions_gdf`` (categories unseen in ``fit`` are ignored, as in srai).

        Raises:
            NotFittedError: If ``fit`` has not been called.
        """

        if not hasattr(self, "embedder_"):
            raise NotFittedError("SraiStyleEmbedder is not fitted: call fit(regions_gdf, features_gdf, joint_gdf)")
        city = srai_city(regions_gdf, features_gdf, joint_gdf, columns=self.columns_)
        embedding = self.embedder_.transform(city)
        embedding.index = regions_gdf.index.copy()
        embedding.index.name = "region_id"
        return embedding

    def fit_transform(self, regions_gdf: gpd.GeoDataFrame, features_gdf: gpd.GeoDataFrame,
                      joint_gdf: pd.DataFrame) -> pd.DataFrame:
        return self.fit(regions_gdf, features_gdf, joint_gdf).transform(regions_gdf, features_gdf, joint_gdf)
