"""The Embedder interface: learn one vector per region from the views of a city, without labels."""

from __future__ import annotations

import abc
import inspect
from typing import Any

import numpy as np
import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.errors import NotFittedError

#: Separator of a modality block's name and column in an embedding's column names (``poi__3``): heads that
#: treat modalities apart (``moe``) split an embedding into blocks by it.
BLOCK_SEP = "__"


class Embedder(abc.ABC):
    """Learns one vector per region from the views of a city.

    Embedders never see labels, so they may be fit once on every region of a city and reused by every
    protocol and task. Constructors only store their arguments (scikit-learn style); ``fit`` validates.
    """

    #: Views the method reads; a dataset lacking one makes the method unavailable there.
    required_views: tuple[str, ...] = ()
    #: Whether the method needs region locations.
    needs_locations: bool = False

    @abc.abstractmethod
    def fit(self, city: CityData) -> Embedder:
        """Learn from the city's views (never its targets)."""

    @abc.abstractmethod
    def transform(self, city: CityData) -> pd.DataFrame:
        """Embed every region.

        Returns:
            Columns ``emb_0 .. emb_{d-1}``, indexed by ``region_id`` like ``city.regions``.

        Raises:
            NotFittedError: If ``fit`` has not been called.
        """

    def fit_transform(self, city: CityData) -> pd.DataFrame:
        return self.fit(city).transform(city)

    def get_params(self) -> dict[str, Any]:
        """Constructor arguments, for hashing a configuration into the results store."""
        signature = inspect.signature(type(self).__init__)
        return {name: getattr(self, name) for name in signature.parameters if name != "self"}

    def _check_fitted(self, attribute: str) -> None:
        if not hasattr(self, attribute):
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit(city) first")


def as_embedding(values: np.ndarray, ids: pd.Index) -> pd.DataFrame:
    """Wrap an (N, d) array as an embedding frame with ``emb_*`` columns."""
    frame = pd.DataFrame(
        np.asarray(values, dtype=float), index=ids, columns=[f"emb_{k}" for k in range(values.shape[1])]
    )
    frame.index.name = "region_id"
    return frame
