"""A seeded synthetic city with real structure, for fast tests and scaling benchmarks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from urbanprofile.data.city import SPARSE_VIEW_ABOVE, CityData, frame_from_array, sparse_square_view


def _smooth_fields(xy: np.ndarray, n_fields: int, length_km: float, rng: np.random.Generator) -> np.ndarray:
    """Spatially autocorrelated random fields: sums of Gaussian bumps at random centres."""
    n_bumps = 12
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    centres = rng.uniform(lo, hi, size=(n_fields, n_bumps, 2))
    weights = rng.normal(size=(n_fields, n_bumps))
    d2 = ((xy[None, None, :, :] - centres[:, :, None, :]) ** 2).sum(-1)
    fields = (weights[:, :, None] * np.exp(-d2 / (2 * length_km**2))).sum(1)
    return fields.T  # (n_regions, n_fields)


#: Destinations a trip may go to in the sparse OD model: the nearest cells.
SPARSE_OD_NEIGHBOURS = 64


def _sparse_gravity(
    xy: np.ndarray, population: np.ndarray, attraction: np.ndarray, side: float, rng: np.random.Generator
) -> Any:
    """Gravity-model trips restricted to each cell's nearest cells, as a CSR matrix (O(N k) memory)."""
    from scipy import sparse
    from sklearn.neighbors import NearestNeighbors

    n = len(xy)
    k = min(SPARSE_OD_NEIGHBOURS, n)
    dist, idx = NearestNeighbors(n_neighbors=k).fit(xy).kneighbors(xy)
    gravity = population[:, None] * attraction[idx] * np.exp(-dist / (side / 4))
    trips = rng.poisson(gravity / gravity.sum() * 30 * n * k**0.5)
    rows = np.repeat(np.arange(n), k)
    return sparse.csr_matrix((trips.ravel(), (rows, idx.ravel())), shape=(n, n))


def make_synthetic_city(
    n_regions: int = 100,
    n_poi_categories: int = 12,
    n_landuse_classes: int = 6,
    cell_km: float = 1.0,
    noise: float = 0.2,
    with_geometry: bool = True,
    sparse_od: bool | None = None,
    random_state: int | None = 0,
) -> CityData:
    """Build a city on a grid of square cells whose views and labels depend on each other.

    Land use is a softmax of spatially smooth fields, so neighbouring cells look alike. Each land-use
    class has its own POI mixture, and a cell's POI counts are a Poisson draw from the mixture of its land
    uses. Trips follow a gravity model (origin "population" from residential land, destination
    attraction from POIs, exponential distance decay). Labels are noisy functions of these: check-ins
    follow POIs, crime follows population and nightlife, service calls follow population.

    Args:
        n_regions: Number of cells (laid out on a near-square grid).
        n_poi_categories: POI categories.
        n_landuse_classes: Land-use classes (class 0 is residential).
        cell_km: Cell side in kilometres.
        noise: Multiplicative log-normal label noise.
        with_geometry: Give regions square polygons (else centroids only).
        sparse_od: Draw trips only between each cell and its 64 nearest cells and keep ``od_flows`` as a
            sparse view, with no N x N similarity views (default: above 3,000 cells), so that cities of
            tens of thousands of cells fit in memory.
        random_state: Seed; the same seed gives the same city.
    """
    import geopandas as gpd
    from shapely.geometry import box

    if n_regions < 4:
        raise ValueError(f"n_regions must be at least 4, got {n_regions}")
    rng = np.random.default_rng(random_state)
    cols = int(np.ceil(np.sqrt(n_regions)))
    grid = np.array([(i % cols, i // cols) for i in range(n_regions)], dtype=float)
    xy = (grid + 0.5) * cell_km
    side = cols * cell_km

    logits = 2.5 * _smooth_fields(xy, n_landuse_classes, length_km=side / 5, rng=rng)
    shares = np.exp(logits - logits.max(1, keepdims=True))
    shares /= shares.sum(1, keepdims=True)
    landuse = rng.poisson(shares * 60)

    mixtures = rng.dirichlet(np.full(n_poi_categories, 0.4), size=n_landuse_classes)
    # Centrality: POI density is highest near a downtown.
    downtown = xy.mean(0) + rng.normal(scale=side / 8, size=2)
    dist_down = np.linalg.norm(xy - downtown, axis=1)
    density = 40 * np.exp(-dist_down / (side / 3)) + 3
    poi = rng.poisson(density[:, None] * (shares @ mixtures) * n_poi_categories / 2)

    population = 500 * shares[:, 0] * np.exp(-dist_down / side) + 50
    attraction = poi.sum(1) + 1.0
    if sparse_od is None:
        sparse_od = n_regions > SPARSE_VIEW_ABOVE
    if sparse_od:
        od = _sparse_gravity(xy, population, attraction, side, rng)
    else:
        dist = np.linalg.norm(xy[:, None, :] - xy[None, :, :], axis=-1)
        gravity = population[:, None] * attraction[None, :] * np.exp(-dist / (side / 4))
        od = rng.poisson(gravity / gravity.sum() * 30 * n_regions**1.5)
    out_flow = np.asarray(od.sum(1)).ravel()
    in_flow = np.asarray(od.sum(0)).ravel()

    def noisy(mean: np.ndarray) -> np.ndarray:
        return np.round(mean * rng.lognormal(0.0, noise, size=mean.shape))

    nightlife = poi[:, : max(1, n_poi_categories // 4)].sum(1)
    targets = pd.DataFrame(
        {
            "checkin": noisy(2.0 * poi.sum(1) + 0.05 * in_flow),
            "crime": noisy(0.05 * population + 0.8 * nightlife + 5),
            "service_calls": noisy(0.3 * population + 0.1 * out_flow + 10),
        }
    )
    ids = pd.Index(np.arange(n_regions), name="region_id")
    targets.index = ids

    # A rough local frame around a fictitious city at (0.0, 45.0).
    lat0 = 45.0
    lon = (xy[:, 0] - side / 2) / (111.32 * np.cos(np.deg2rad(lat0)))
    lat = lat0 + (xy[:, 1] - side / 2) / 111.32
    half_lon = cell_km / 2 / (111.32 * np.cos(np.deg2rad(lat0)))
    half_lat = cell_km / 2 / 111.32
    geometry = (
        [box(a - half_lon, b - half_lat, a + half_lon, b + half_lat) for a, b in zip(lon, lat, strict=True)]
        if with_geometry
        else gpd.points_from_xy(lon, lat)
    )
    regions = gpd.GeoDataFrame({"lon": lon, "lat": lat}, index=ids, geometry=geometry, crs="EPSG:4326")
    regions["landuse_district"] = shares.argmax(1)

    neighbors = {}
    for i in range(n_regions):
        gx, gy = grid[i]
        adjacent = []
        for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            j = int((gy + dy) * cols + (gx + dx))
            if 0 <= gx + dx < cols and 0 <= j < n_regions and grid[j][1] == gy + dy:
                adjacent.append(j)
        neighbors[i] = adjacent

    def cosine(a: np.ndarray) -> np.ndarray:
        unit = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        return unit @ unit.T

    views = {
        "poi_counts": frame_from_array(poi, ids, [f"poi_{k}" for k in range(n_poi_categories)]),
        "landuse_counts": frame_from_array(landuse, ids, [f"landuse_{k}" for k in range(n_landuse_classes)]),
    }
    if sparse_od:
        views["od_flows"] = sparse_square_view(od, ids)
    else:
        views["od_flows"] = frame_from_array(od, ids, ids)
        views["od_target"] = frame_from_array(od, ids, ids)
        views["poi_similarity"] = frame_from_array(cosine(poi.astype(float)), ids, ids)
        views["landuse_similarity"] = frame_from_array(cosine(landuse.astype(float)), ids, ids)
    meta = {
        "source": f"make_synthetic_city(n_regions={n_regions}, random_state={random_state})",
        "family": "synthetic",
        "city": "synthetic",
        "description": f"{n_regions} synthetic grid cells of {cell_km} km",
        "paper_folds": {"n_splits": 5, "shuffle": True, "random_state": 2024},
        "drop_zero": ["checkin"],
        "location_source": "grid cells",
        "notes": [],
    }
    return CityData("synthetic", regions, views, targets, neighbors, meta).validate()
