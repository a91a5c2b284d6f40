"""Spatial priors between regions: distances, a distance-based adjacency, hop/distance buckets, neighbourhoods.

Everything here is label-free numpy (no torch), computed once per city. Two shapes of the same
information are produced: dense (N x N matrices, for small cities) and sparse neighbourhoods (the k
nearest regions of each region by distance, for cities too large for N x N attention).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import shortest_path

from urbanprofile.data.city import CityData

#: Distance/hop buckets of the learnable Graphormer-style bias (the last bucket holds "far").
N_BUCKETS = 16
#: Adjacency bandwidth: this many times the mean distance to the ``BANDWIDTH_K``-th nearest region.
BANDWIDTH_K = 6


@dataclass
class SpatialPrior:
    """Spatial relations between regions, dense or as k-nearest neighbourhoods.

    Attributes:
        adjacency: Distance-based adjacency in [0, 1]: dense (N, N), or (N, k) values for ``neighbors``.
        buckets: Integer bucket of each pair (shared-border hops when known, else distance quantiles),
            same shape as ``adjacency``.
        neighbors: ``None`` for dense priors; else (N, k) indices of each region's k nearest regions
            (itself first).
        centrality: Strength centrality c_i = sum_j A_ij, max-normalised to [0, 1], shape (N,).
        source: Where the distances came from, in words.
    """

    adjacency: np.ndarray
    buckets: np.ndarray
    neighbors: np.ndarray | None
    centrality: np.ndarray
    source: str

    @property
    def is_sparse(self) -> bool:
        return self.neighbors is not None


def _gaussian(dist: np.ndarray, bandwidth: float) -> np.ndarray:
    return np.exp(-((dist / max(bandwidth, 1e-9)) ** 2))


def _bandwidth(knn_dist: np.ndarray) -> float:
    """Mean distance to the BANDWIDTH_K-th neighbour (column 0 is the region itself)."""
    k = min(BANDWIDTH_K, knn_dist.shape[1] - 1)
    return float(knn_dist[:, max(k, 1)].mean()) if knn_dist.shape[1] > 1 else 1.0


def _quantile_buckets(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    edges = np.quantile(reference, np.linspace(0, 1, N_BUCKETS + 1)[1:-1])
    return np.searchsorted(edges, values).astype(np.int64)


def _hops(city: CityData) -> np.ndarray | None:
    """Shared-border hop counts (N, N) from ``city.neighbors``, or ``None`` when there are none."""
    if city.neighbors is None or not any(city.neighbors.values()):
        return None
    position = {region: i for i, region in enumerate(city.region_ids)}
    rows = [position[r] for r, adj in city.neighbors.items() for _ in adj]
    cols = [position[a] for adj in city.neighbors.values() for a in adj]
    graph = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(city.n_regions,) * 2)
    hops = shortest_path(graph, unweighted=True, directed=False)
    return np.where(np.isfinite(hops), hops, N_BUCKETS - 1)


def mobility_proximity(od: np.ndarray) -> np.ndarray:
    """A proximity in [0, 1] from trips in both directions (for cities with no locations)."""
    flows = np.log1p(np.asarray(od, dtype=float) + np.asarray(od, dtype=float).T)
    np.fill_diagonal(flows, 0.0)
    top = flows.max()
    return flows / top if top > 0 else flows


def spatial_prior(city: CityData, k: int | None = None, dense_limit: int = 4000) -> SpatialPrior:
    """The spatial prior of a city: dense when it has at most ``dense_limit`` regions, else k-nearest.

    Distances come from region centroids (local km). Buckets are shared-border hops when the city has
    an adjacency (NYC's ``neighbors.json``) and distance quantiles otherwise. A city with no locations
    falls back to a mobility-derived proximity (``od_flows``) and says so with a warning.

    Args:
        city: The city.
        k: Neighbourhood size of the sparse mode (default 32); forces the sparse mode when given.
        dense_limit: Largest city handled with dense N x N priors.
    """
    n = city.n_regions
    sparse_mode = k is not None or n > dense_limit
    k = min(k or 32, n)
    if not city.has_locations:
        if "od_flows" not in city.views:
            raise ValueError(f"{city.name}: no region locations and no od_flows view to derive proximity from")
        warnings.warn(
            f"{city.name} has no region locations: spatial prior falls back to mobility-derived proximity",
            UserWarning, stacklevel=2,
        )
        proximity = mobility_proximity(city.view("od_flows").to_numpy())
        np.fill_diagonal(proximity, 1.0)
        buckets = _quantile_buckets(-proximity, -proximity.ravel())
        if sparse_mode:
            idx = np.argsort(-proximity, axis=1, kind="stable")[:, :k]
            proximity = np.take_along_axis(proximity, idx, 1)
            return SpatialPrior(proximity, np.take_along_axis(buckets, idx, 1), idx,
                                _centrality(proximity), "mobility-derived proximity (no locations)")
        return SpatialPrior(proximity, buckets, None, _centrality(proximity),
                            "mobility-derived proximity (no locations)")

    xy = city.coordinates_km()
    if sparse_mode:
        from sklearn.neighbors import NearestNeighbors

        dist, idx = NearestNeighbors(n_neighbors=k).fit(xy).kneighbors(xy)
        adjacency = _gaussian(dist, _bandwidth(dist))
        buckets = _quantile_buckets(dist, dist[:, 1:].ravel() if k > 1 else dist.ravel())
        return SpatialPrior(adjacency, buckets, idx.astype(np.int64), _centrality(adjacency),
                            f"{k} nearest centroids (sparse)")
    dist = np.linalg.norm(xy[:, None, :] - xy[None, :, :], axis=-1)
    knn = np.sort(dist, axis=1)[:, : BANDWIDTH_K + 1]
    adjacency = _gaussian(dist, _bandwidth(knn))
    hops = _hops(city)
    if hops is not None:
        buckets = np.clip(hops, 0, N_BUCKETS - 1).astype(np.int64)
        source = "centroid distances + shared-border hops"
    else:
        buckets = _quantile_buckets(dist, dist[~np.eye(n, dtype=bool)])
        buckets[np.eye(n, dtype=bool)] = 0
        source = "centroid distances"
    return SpatialPrior(adjacency, buckets, None, _centrality(adjacency), source)


def _centrality(adjacency: np.ndarray) -> np.ndarray:
    """Strength centrality sum_j A_ij (self, always present with A_ii = 1, excluded), max-normalised."""
    strength = np.clip(adjacency.sum(axis=1) - 1.0, 0, None)
    top = strength.max()
    return strength / top if top > 0 else strength


def knn_from_similarity(similarity: np.ndarray, k: int) -> np.ndarray:
    """Each region's k most similar regions (itself first): the graph of a similarity view."""
    sim = np.array(similarity, dtype=float, copy=True)
    np.fill_diagonal(sim, np.inf)
    k = min(k, len(sim))
    return np.argsort(-sim, axis=1, kind="stable")[:, :k].astype(np.int64)
