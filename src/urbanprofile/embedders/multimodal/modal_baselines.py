"""Baselines over the same frozen modality inputs as UrbanFusion: ``concat`` and ``tfidf-captions``.

``concat`` is the baseline UrbanFusion's reviewers asked for: the frozen encoder outputs side by side, probed by
the same tuned Ridge. Each modality block is z-scored per column and divided by the square root of its width
(every block has unit total variance, so a 1280-d image block does not drown a 384-d text block). A region
lacking a modality gets the column means (zeros after z-scoring) in that block plus a ``has_<modality>``
indicator column that says so; such regions are counted in ``imputed_``.

``tfidf-captions`` is latent semantic analysis of the region's words: TF-IDF of all the region's caption
text (tile captions or geo-text, and street-view captions when ``streetview=True``) reduced by truncated SVD.
Regions without any text are counted in ``no_text_`` and get an indicator column.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.embedders.base import Embedder, as_embedding
from urbanprofile.embedders.multimodal.modalities import check_modalities
from urbanprofile.embedders.multimodal.urbanfusion import city_modalities
from urbanprofile.errors import MethodUnavailableError


class ConcatModalities(Embedder):
    """The frozen modality encoder outputs concatenated (block-scaled; absent modalities imputed + flagged).

    Args:
        modalities: Modalities to concatenate (``None``: all the city has).
    """

    def __init__(self, modalities: Sequence[str] | None = None, random_state: int | None = None) -> None:
        self.modalities = modalities
        self.random_state = random_state

    def fit(self, city: CityData) -> ConcatModalities:
        self.names_ = check_modalities(city, self.modalities)
        feats = city_modalities(city, self.names_)
        self.mean_, self.scale_ = {}, {}
        for m in self.names_:
            rows = feats.values[m][feats.present[m]]
            self.mean_[m] = rows.mean(0)
            self.scale_[m] = (rows.std(0) + 1e-6) * np.sqrt(rows.shape[1])
        return self

    def transform(self, city: CityData) -> pd.DataFrame:
        self._check_fitted("names_")
        feats = city_modalities(city, self.names_)
        blocks = []
        self.imputed_: dict[str, int] = {}
        for m in self.names_:
            block = np.nan_to_num((feats.values[m] - self.mean_[m]) / self.scale_[m], nan=0.0)
            blocks.append(block)
            missing = ~feats.present[m]
            if missing.any():
                self.imputed_[m] = int(missing.sum())
                blocks.append(feats.present[m][:, None].astype(float))
        return as_embedding(np.hstack(blocks), city.region_ids)


class TfidfCaptions(Embedder):
    """TF-IDF of each region's caption text, reduced with truncated SVD (LSA).

    Args:
        n_components: SVD dimensions.
        streetview: Also use the street-view captions.
        max_features: Vocabulary size cap.
    """

    def __init__(self, n_components: int = 128, streetview: bool = True, max_features: int = 20000,
                 random_state: int | None = None) -> None:
        self.n_components = n_components
        self.streetview = streetview
        self.max_features = max_features
        self.random_state = random_state

    @classmethod
    def unavailable_reason(cls, name: str, city: CityData, **params: object) -> str | None:
        """Why the method cannot run on ``city`` (no caption text), or ``None``; the registry asks before fitting."""
        if not any(k in city.modalities for k in ("tile_caption", "geo_text")):
            return f"{name} needs caption text (tile_caption or geo_text), which {city.name} lacks"
        return None

    def _documents(self, city: CityData) -> list[str]:
        tables = [city.modalities[k] for k in ("tile_caption", "geo_text") if k in city.modalities]
        if self.streetview and "streetview_caption" in city.modalities:
            tables.append(city.modalities["streetview_caption"])
        if not tables:
            raise MethodUnavailableError(f"dataset {city.name!r} has no caption text (tile_caption or geo_text)")
        text = pd.concat([t[["region_id", "text"]] for t in tables])
        joined = text.groupby("region_id", sort=False)["text"].agg(" ".join)
        return [str(v) for v in joined.reindex(city.region_ids).fillna("")]

    def fit(self, city: CityData) -> TfidfCaptions:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        if self.n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {self.n_components}")
        docs = self._documents(city)
        self.vectorizer_ = TfidfVectorizer(sublinear_tf=True, min_df=2, max_features=self.max_features,
                                           stop_words="english")
        matrix = self.vectorizer_.fit_transform(docs)
        k = min(self.n_components, matrix.shape[1] - 1, matrix.shape[0] - 1)
        self.svd_ = TruncatedSVD(n_components=max(k, 1), random_state=self.random_state).fit(matrix)
        return self

    def transform(self, city: CityData) -> pd.DataFrame:
        self._check_fitted("svd_")
        docs = self._documents(city)
        values = self.svd_.transform(self.vectorizer_.transform(docs))
        empty = np.array([not d.strip() for d in docs])
        self.no_text_ = int(empty.sum())
        if empty.any():
            values = np.hstack([values, (~empty)[:, None].astype(float)])
        return as_embedding(values, city.region_ids)
