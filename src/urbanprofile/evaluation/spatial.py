"""Spatial structure for evaluation: blocks from clustering locations, and region adjacency weights."""

from __future__ import annotations

import numpy as np
from scipy import sparse

from urbanprofile.data.city import CityData

#: Seed of the block clustering, fixed so that blocks are the same for every method and run.
BLOCK_SEED = 2024


#: Above this many regions the block centres are fitted on a seeded sample of this many centroids.
BLOCK_FIT_SAMPLE = 50_000


def spatial_blocks(city: CityData, n_blocks: int, seed: int = BLOCK_SEED) -> np.ndarray:
    """Cluster region centroids (local km) into ``n_blocks`` contiguous blocks; one label per region.

    Above :data:`BLOCK_FIT_SAMPLE` regions the k-means centres are fitted on a seeded sample of that many
    centroids and every region goes to its nearest centre: 50 blocks of a million cells then take seconds
    instead of minutes (k-means with 10 starts over every cell), with the same kind of contiguous blocks.
    Another ``seed`` draws another layout of blocks (to measure how much a figure depends on the one layout).
    """
    key = ("spatial_blocks", n_blocks) if seed == BLOCK_SEED else ("spatial_blocks", n_blocks, seed)
    if key not in city.cache:
        city.cache[key] = block_labels(city.coordinates_km(), n_blocks, seed)
    return np.asarray(city.cache[key])


def block_labels(xy: np.ndarray, n_blocks: int, seed: int = BLOCK_SEED) -> np.ndarray:
    """K-means block of each point (local km), fitted on at most :data:`BLOCK_FIT_SAMPLE` seeded points."""
    from sklearn.cluster import KMeans

    n = min(n_blocks, len(xy))
    kmeans = KMeans(n_clusters=n, n_init=10, random_state=seed)
    if len(xy) <= BLOCK_FIT_SAMPLE:
        return kmeans.fit_predict(xy)
    sample = np.sort(np.random.default_rng(seed).choice(len(xy), BLOCK_FIT_SAMPLE, replace=False))
    return kmeans.fit(xy[sample]).predict(xy)


def adjacency_weights(city: CityData, k: int = 6) -> tuple[sparse.csr_matrix, str]:
    """Binary symmetric region adjacency: shared borders when known, else k nearest centroids.

    Returns:
        The (N, N) weights in the order of ``city.regions`` and a word on where they came from.
    """
    key = ("adjacency_weights", k)
    if key in city.cache:
        return city.cache[key]
    n = city.n_regions
    if city.neighbors is not None and any(city.neighbors.values()):
        position = {region: i for i, region in enumerate(city.region_ids)}
        rows, cols = [], []
        for region, adjacent in city.neighbors.items():
            for other in adjacent:
                rows.append(position[region])
                cols.append(position[other])
        row_idx, col_idx = np.asarray(rows, dtype=int), np.asarray(cols, dtype=int)
        source = "neighbors"
    else:
        from sklearn.neighbors import NearestNeighbors

        xy = city.coordinates_km()
        k = min(k, n - 1)
        _, idx = NearestNeighbors(n_neighbors=k + 1).fit(xy).kneighbors(xy)
        # Arrays, not lists: a million regions with 6 neighbours each are 12 M Python ints otherwise.
        row_idx = np.repeat(np.arange(n), k)
        col_idx = idx[:, 1:].ravel()
        source = f"{k} nearest centroids"
    weights = sparse.csr_matrix((np.ones(len(row_idx)), (row_idx, col_idx)), shape=(n, n))
    weights = ((weights + weights.T) > 0).astype(float)
    weights.setdiag(0)
    weights.eliminate_zeros()
    city.cache[key] = (sparse.csr_matrix(weights), source)
    return city.cache[key]


def morans_i(values: np.ndarray, weights: sparse.csr_matrix) -> float:
    """Moran's I of ``values`` under binary ``weights`` (regions without neighbours are ignored)."""
    has = np.asarray(weights.sum(axis=1)).ravel() > 0
    if has.sum() < 3:
        return float("nan")
    w = weights[has][:, has]
    z = values[has] - values[has].mean()
    denom = float(z @ z)
    total = float(w.sum())
    if denom == 0 or total == 0:
        return float("nan")
    return float(len(z) / total * (z @ (w @ z)) / denom)
