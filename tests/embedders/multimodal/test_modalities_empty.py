"""A modality whose table has no rows is not offered to the multimodal methods."""

from __future__ import annotations

import pandas as pd

from urbanprofile.data import make_synthetic_city
from urbanprofile.embedders.multimodal.modalities import available_modalities


def test_empty_image_and_caption_tables_are_not_available() -> None:
    city = make_synthetic_city(n_regions=12, random_state=0)
    ids = city.regions.index[:3]
    city.modalities = {
        "tile_caption": pd.DataFrame({"region_id": ids, "caption": ["a park", "a road", "houses"]}),
        "tile_image": pd.DataFrame(columns=["region_id", "image"]),
        "streetview_caption": pd.DataFrame(columns=["region_id", "caption"]),
    }
    have = available_modalities(city)
    assert "text" in have and "image" not in have and "streetview" not in have
    city.modalities["tile_image"] = pd.DataFrame({"region_id": ids[:1], "image": ["t.jpg"]})
    assert "image" in available_modalities(city)
