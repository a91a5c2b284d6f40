"""Per-modality feature blocks (the input of the multi-modal heads, e.g. ``moe``), columns named by block.

Each modality the city has (POI, land use, mobility, location, caption text, ...; see
:mod:`urbanprofile.embedders.multimodal.modalities`) becomes one block: z-scored per column, and blocks wider than
``max_block_width`` reduced to that many principal components (label-free, like every embedder). A region
without a modality gets zeros there and a ``has`` indicator column in that block. Columns are named
``<modality>__<k>``, which is how :func:`urbanprofile.heads.registry.embedding_blocks` finds the blocks;
a single-input head sees the blocks concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA

from urbanprofile.data.city import CityData
from urbanprofile.embedders.base import BLOCK_SEP, Embedder
from urbanprofile.embedders.multimodal.modalities import check_modalities
from urbanprofile.embedders.multimodal.urbanfusion import city_modalities


class ModalityBlocks(Embedder):
    """The city's modalities as named, standardised blocks.

    Args:
        modalities: Modalities to include (``None``: all the city has, street view and images excepted:
            they are slow to encode and cover few regions here).
        max_block_width: Blocks wider than this are reduced by PCA.
    """

    def __init__(self, modalities: Sequence[str] | None = None, max_block_width: int = 32,
                 random_state: int | None = None) -> None:
        self.modalities = modalities
        self.max_block_width = max_block_width
        self.random_state = random_state

    def fit(self, city: CityData) -> ModalityBlocks:
        if self.max_block_width < 1:
            raise ValueError(f"max_block_width must be >= 1, got {self.max_block_width}")
        names = self.modalities
        if names is None:
            names = [m for m in check_modalities(city, None) if m not in ("streetview", "image")]
        self.names_ = check_modalities(city, names)
        self.blocks_ = self._blocks(city)
        return self

    def _blocks(self, city: CityData) -> dict[str, np.ndarray]:
        feats = city_modalities(city, self.names_)
        blocks = {}
        for m in self.names_:
            present = feats.present[m]
            values = np.asarray(feats.values[m], dtype=float)
            rows = values[present]
            std = rows.std(axis=0)
            z = np.where(present[:, None], (values - rows.mean(axis=0)) / np.where(std > 0, std, 1.0), 0.0)
            if z.shape[1] > self.max_block_width:
                z = PCA(n_components=self.max_block_width, random_state=0).fit_transform(z)
                z /= z[:, :1].std() or 1.0
            if not present.all():
                z = np.hstack([z, present[:, None].astype(float)])
            blocks[m] = z
        return blocks

    def transform(self, city: CityData) -> pd.DataFrame:
        self._check_fitted("names_")
        blocks = self._blocks(city)
        columns = [f"{m}{BLOCK_SEP}{k}" for m, block in blocks.items() for k in range(block.shape[1])]
        frame = pd.DataFrame(np.hstack(list(blocks.values())), index=city.region_ids, columns=columns)
        frame.index.name = "region_id"
        return frame
