"""An embedding made elsewhere (a file or a DataFrame) served as a method, so it is probed like a built-in one."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.data.embeddings import check_embedding, file_hash, read_embedding_file
from urbanprofile.embedders.base import Embedder
from urbanprofile.errors import DataError


class ExternalEmbedding(Embedder):
    """Returns a given embedding, checked against the city; fitting learns nothing.

    Args:
        source: An embedding file (``.parquet`` / ``.csv``) or a DataFrame indexed by ``region_id``.
        content_hash: The file's content hash when it was registered; a file changed since then is refused
            (its results would be stored under the old content's key).
        random_state: Ignored (the embedding is fixed); accepted like every method's.
    """

    def __init__(self, source: str | Path | pd.DataFrame, content_hash: str | None = None,
                 random_state: int | None = None) -> None:
        self.source = source
        self.content_hash = content_hash
        self.random_state = random_state

    def _label(self) -> str:
        return "the embedding DataFrame" if isinstance(self.source, pd.DataFrame) else str(self.source)

    def fit(self, city: CityData) -> ExternalEmbedding:
        if isinstance(self.source, pd.DataFrame):
            frame = self.source
        else:
            path = Path(self.source)
            frame = read_embedding_file(path)
            if self.content_hash is not None and file_hash(path) != self.content_hash:
                raise DataError(f"{path}: changed since it was registered; run again to evaluate the new content")
        self.embedding_ = check_embedding(frame, city, self._label())
        return self

    def transform(self, city: CityData) -> pd.DataFrame:
        self._check_fitted("embedding_")
        if not self.embedding_.index.equals(city.region_ids):
            return check_embedding(self.embedding_, city, self._label())
        return self.embedding_
