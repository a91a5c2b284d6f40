"""A learned embedding beside the raw count features: does the learned part add anything to raw counts?

The embedding has the learned method's ``emb_*`` columns followed by ``raw-all``'s features as
``raw_*`` columns; the ``ridge-blocks`` head (:class:`~urbanprofile.heads.probes.BlockRidgeProbe`)
standardises each column and chooses the learned block's weight against the raw block by inner CV
(from raw features alone to the learned embedding alone), so under ``nested`` and ``spatial`` the
variant is never worse than its parts by construction of the search, only by the noise of the choice.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.data.features import ALL_VIEWS, stacked_views
from urbanprofile.embedders.base import Embedder, ReportsEpochs, candidates_of


class WithRawFeatures(Embedder):
    """A learned embedder's embedding (``emb_*``) with raw view features (``raw_*``) side by side.

    Args:
        learned: ``"module:Class"`` of the learned :class:`Embedder`.
        learned_params: Its constructor arguments (``random_state`` is passed through).
        raw_views: Views stacked as raw features (``od_flows`` as out- and in-flow profiles); the learned
            embedder reads the same views when it takes a ``views`` argument and ``learned_params`` sets none.
        random_state: Seed of the learned embedder.
    """

    #: Passed to the learned embedder (the CLI sets it to drive a progress bar over epochs).
    on_epoch: Callable[[int, int], None] | None = None

    def __init__(self, learned: str = "urbanprofile.embedders.multiview.srel:SRELEmbedder",
                 learned_params: dict[str, Any] | None = None, raw_views: tuple[str, ...] = ALL_VIEWS,
                 random_state: int | None = 0) -> None:
        self.learned = learned
        self.learned_params = learned_params
        self.raw_views = raw_views
        self.random_state = random_state

    @property
    def required_views(self) -> tuple[str, ...]:
        return tuple(self.raw_views)

    def _build_learned(self) -> Embedder:
        module_name, _, class_name = self.learned.partition(":")
        if not module_name or not class_name:
            raise ValueError(f"learned must be 'module:Class', got {self.learned!r}")
        cls = getattr(importlib.import_module(module_name), class_name)
        params = dict(self.learned_params or {})
        if "views" in inspect.signature(cls.__init__).parameters:
            # The learned part reads the views the raw part stacks (those a city has), unless told otherwise.
            params.setdefault("views", tuple(self.raw_views))
        embedder: Embedder = cls(**params, random_state=self.random_state)
        if self.on_epoch is not None and isinstance(embedder, ReportsEpochs):
            embedder.on_epoch = self.on_epoch
        return embedder

    def fit(self, city: CityData) -> WithRawFeatures:
        """Fit the learned embedder (never on targets) and keep its checkpoints, each beside the raw features."""
        return self.use_fitted(self._build_learned().fit(city), city)

    def use_fitted(self, learned: Embedder, city: CityData) -> WithRawFeatures:
        """Take an already fitted learned embedder of ``city`` (e.g. to reuse one training for both variants)."""
        if not self.raw_views:
            raise ValueError("raw_views must name at least one view")
        raw = self._raw(city)
        self.learned_ = learned
        self.embedding_ = self._join(self.learned_.transform(city), raw)
        candidates = candidates_of(self.learned_) or {}
        self.candidates_ = {label: self._join(frame, raw) for label, frame in candidates.items()}
        self.log_ = getattr(self.learned_, "log_", None)
        return self

    def _raw(self, city: CityData) -> pd.DataFrame:
        values = stacked_views(city, tuple(self.raw_views))
        return pd.DataFrame(values, index=city.region_ids, columns=[f"raw_{k}" for k in range(values.shape[1])])

    @staticmethod
    def _join(learned: pd.DataFrame, raw: pd.DataFrame) -> pd.DataFrame:
        frame = pd.concat([learned, raw.loc[learned.index]], axis=1)
        frame.index.name = "region_id"
        return frame

    def transform(self, city: CityData) -> pd.DataFrame:
        self._check_fitted("embedding_")
        if not city.region_ids.equals(self.embedding_.index):
            raise ValueError("WithRawFeatures is transductive: transform the city it was fit on")
        return self.embedding_.copy()
