"""Worked example: a new embedder in one module plus one registration (see docs/extending.md).

`PoiShareEmbedder` describes each region by the share of each POI category among its POIs, the
"composition" view many region-profiling papers start from. It learns nothing, so `fit` only checks
its input; a learned method would train in `fit` and keep what it learned in attributes ending in `_`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from urbanprofile.data import CityData, make_synthetic_city
from urbanprofile.embedders.base import Embedder, as_embedding
from urbanprofile.evaluation import evaluate_embedding
from urbanprofile.methods import MethodSpec, get_method, register_method


class PoiShareEmbedder(Embedder):
    """Share of each POI category among a region's POIs (a region without POIs gets zeros)."""

    def __init__(self, smoothing: float = 0.0, random_state: int | None = None) -> None:
        self.smoothing = smoothing
        self.random_state = random_state  # unused: the method is deterministic

    def fit(self, city: CityData) -> PoiShareEmbedder:
        if self.smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {self.smoothing}")
        self.n_categories_ = city.view("poi_counts").shape[1]
        return self

    def transform(self, city: CityData) -> pd.DataFrame:
        self._check_fitted("n_categories_")
        counts = city.view("poi_counts").reindex(city.regions.index).to_numpy(dtype=float) + self.smoothing
        totals = counts.sum(axis=1, keepdims=True)
        shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        return as_embedding(shares, city.regions.index)


def register() -> MethodSpec:
    """The one registration: after it, the CLI, the benchmark grid and the store know `poi-share`."""
    return register_method(
        MethodSpec(
            name="poi-share",
            factory=f"{__name__}:PoiShareEmbedder",
            requires_views=("poi_counts",),
            description="Share of each POI category among a region's POIs (docs example)",
        ),
        replace=True,
    )


if __name__ == "__main__":
    register()
    city = make_synthetic_city(n_regions=60, random_state=0)
    embedding = get_method("poi-share").build(random_state=0).fit_transform(city)
    task = city.tasks[0]
    result = evaluate_embedding(city, embedding, task=task, protocol="nested")
    print(f"poi-share on {city.name}, {task}, nested: R² {result.metrics['r2']:.3f}")
