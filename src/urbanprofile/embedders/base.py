"""The Embedder interface: learn one vector per region from the views of a city, without labels."""

from __future__ import annotations

import abc
import inspect
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.errors import NotFittedError

#: Separator of a modality block's name and column in an embedding's column names (``poi__3``): heads that
#: treat modalities apart (``moe``) split an embedding into blocks by it.
BLOCK_SEP = "__"


class Embedder(abc.ABC):
    """Learns one vector per region from the views of a city.

    Embedders never see labels, so they may be fit once on every region of a city and reused by every
    protocol and task. Constructors only store their arguments (scikit-learn style); ``fit`` validates.

    What a method needs (views, locations) is declared once, in its :class:`~urbanprofile.methods.MethodSpec`,
    never on the class; an embedder that reads a choice of views takes them as an argument (the spec's
    ``views_param``) and is built with the spec's views.
    """

    @abc.abstractmethod
    def fit(self, city: CityData) -> Embedder:
        """Learn from the city's views (never its targets)."""

    @abc.abstractmethod
    def transform(self, city: CityData) -> pd.DataFrame:
        """Embed every region.

        Returns:
            Columns ``emb_0 .. emb_{d-1}``, indexed by ``region_id`` like ``city.regions``.

        Raises:
            NotFittedError: If ``fit`` has not been called.
        """

    def fit_transform(self, city: CityData) -> pd.DataFrame:
        return self.fit(city).transform(city)

    def get_params(self) -> dict[str, Any]:
        """Constructor arguments, for hashing a configuration into the results store."""
        signature = inspect.signature(type(self).__init__)
        return {name: getattr(self, name) for name in signature.parameters if name != "self"}

    def _check_fitted(self, attribute: str) -> None:
        if not hasattr(self, attribute):
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit(city) first")


@runtime_checkable
class ReportsEpochs(Protocol):
    """An embedder trained in epochs that says when each one ends (the CLI's and the benchmark's progress bars).

    The caller sets ``on_epoch`` before ``fit``; ``fit`` calls ``on_epoch(epoch, total)`` after every epoch
    when it is not ``None``. Declare it on the class (``on_epoch: Callable[[int, int], None] | None = None``),
    so that ``isinstance(embedder, ReportsEpochs)`` holds before ``fit``.
    """

    on_epoch: Callable[[int, int], None] | None


@runtime_checkable
class KeepsCandidates(Protocol):
    """A fitted embedder that also keeps other label-free embeddings of itself, such as training checkpoints.

    ``candidates_`` maps a label (``"epoch 40"``) to an embedding shaped like ``transform``'s output. Under
    ``nested`` and ``spatial`` each outer fold uses the candidate with the lowest inner-CV error on its training
    regions; ``paper`` uses ``transform``'s embedding. Set by ``fit``: ``isinstance`` holds only once fitted.
    """

    candidates_: dict[str, pd.DataFrame]


def candidates_of(embedder: Embedder) -> dict[str, pd.DataFrame] | None:
    """The fitted embedder's candidate embeddings (:class:`KeepsCandidates`), or ``None`` when it keeps none."""
    return embedder.candidates_ if isinstance(embedder, KeepsCandidates) else None


def as_embedding(values: np.ndarray, ids: pd.Index) -> pd.DataFrame:
    """Wrap an (N, d) array as an embedding frame with ``emb_*`` columns."""
    frame = pd.DataFrame(
        np.asarray(values, dtype=float), index=ids, columns=[f"emb_{k}" for k in range(values.shape[1])]
    )
    frame.index.name = "region_id"
    return frame
