"""Worked example: an urbanprofile method inside a srai pipeline (see docs/srai.md).

A srai user cuts an area into H3 cells, joins mapped objects to them and embeds the regions. Here the
objects are random points with an ``amenity`` and a ``shop`` tag, so the example runs offline; with
srai's OSM loaders the frames have the same shape. ``SraiStyleEmbedder`` takes srai's three frames and
returns srai's convention, a DataFrame indexed by ``region_id``, so it drops in where srai's own
``CountEmbedder`` or ``Hex2VecEmbedder`` would stand.
"""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
from shapely.geometry import box
from srai.embedders import CountEmbedder
from srai.joiners import IntersectionJoiner
from srai.regionalizers import H3Regionalizer

from urbanprofile.interop.srai import SraiStyleEmbedder


def srai_frames(n_features: int = 800, seed: int = 0) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame, pd.DataFrame]:
    """srai's ``(regions_gdf, features_gdf, joint_gdf)`` for a small area of Berlin cut into H3 cells."""
    area = gpd.GeoDataFrame(geometry=[box(13.38, 52.50, 13.42, 52.53)], crs="EPSG:4326")
    regions = H3Regionalizer(resolution=9).transform(area)
    rng = np.random.default_rng(seed)
    # Objects crowd towards the north-east corner, so the regions differ in more than noise.
    x = 13.38 + 0.04 * rng.beta(2.0, 1.2, n_features)
    y = 52.50 + 0.03 * rng.beta(2.0, 1.2, n_features)
    features = gpd.GeoDataFrame(
        {"amenity": rng.choice(["cafe", "school", "bank", None], n_features),
         "shop": rng.choice(["bakery", "books", None, None], n_features)},
        geometry=gpd.points_from_xy(x, y), crs="EPSG:4326",
        index=pd.Index(range(n_features), name="feature_id"))
    joint = IntersectionJoiner().transform(regions, features)
    return regions, features, joint


def main() -> pd.DataFrame:
    regions, features, joint = srai_frames()
    counts = CountEmbedder().transform(regions, features, joint)  # srai's own baseline, for comparison
    embedding = SraiStyleEmbedder("pca", n_components=4, random_state=0).fit_transform(regions, features, joint)
    print(f"{len(regions)} H3 cells, srai's counts {counts.shape}, urbanprofile's pca {embedding.shape}")
    print(embedding.head())
    return embedding


if __name__ == "__main__":
    main()
