"""Applicability: flag regions that lie outside what a model saw, in embedding space or on the map."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.neighbors import NearestNeighbors

#: A region is flagged when it is farther from every labelled region than this quantile of the labelled
#: regions' distances to their own nearest labelled neighbour.
THRESHOLD_QUANTILE = 0.99


def nearest_distance(reference: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Distance of each query row to its nearest reference row."""
    dist, _ = NearestNeighbors(n_neighbors=1).fit(reference).kneighbors(query)
    return np.asarray(dist[:, 0], dtype=float)


def leave_one_out_threshold(reference: np.ndarray) -> float:
    """The quantile of each reference row's distance to its nearest other reference row."""
    dist, _ = NearestNeighbors(n_neighbors=2).fit(reference).kneighbors(reference)
    return float(np.quantile(dist[:, 1], THRESHOLD_QUANTILE))


def lonlat_km(lonlat: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Lon/lat degrees to kilometres on a plane about a fixed origin (the fit city's mean centroid)."""
    km_per_deg = 111.32
    x = (lonlat[:, 0] - origin[0]) * km_per_deg * np.cos(np.deg2rad(origin[1]))
    y = (lonlat[:, 1] - origin[1]) * km_per_deg
    return np.column_stack([x, y])


def _beyond(distance: np.ndarray, threshold: float) -> np.ndarray:
    """Strictly beyond the threshold: on a regular grid a region one step from a labelled one ties with it."""
    return np.asarray((distance > threshold) & ~np.isclose(distance, threshold, rtol=1e-6, atol=0.0))


def applicability_table(
    embedding_distance: np.ndarray, embedding_threshold: float,
    spatial_distance_km: np.ndarray | None, spatial_threshold_km: float | None, index: pd.Index,
) -> pd.DataFrame:
    """``applicable`` (bool), ``applicability_reason`` (empty when applicable) and both distances per region."""
    reasons: list[list[str]] = [[] for _ in range(len(index))]
    for i in np.where(_beyond(embedding_distance, embedding_threshold))[0]:
        reasons[i].append(f"far in embedding space from every labelled region ({embedding_distance[i]:.3g} > "
                          f"{embedding_threshold:.3g})")
    if spatial_distance_km is not None and spatial_threshold_km is not None:
        for i in np.where(_beyond(spatial_distance_km, spatial_threshold_km))[0]:
            reasons[i].append(f"far on the map from every labelled region ({spatial_distance_km[i]:.3g} km > "
                              f"{spatial_threshold_km:.3g} km)")
    frame = pd.DataFrame({
        "applicable": [not r for r in reasons],
        "applicability_reason": ["; ".join(r) for r in reasons],
        "embedding_distance": embedding_distance,
        "spatial_distance_km": spatial_distance_km if spatial_distance_km is not None else np.nan,
    }, index=index)
    return frame
