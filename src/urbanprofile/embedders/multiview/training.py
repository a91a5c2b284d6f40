"""Multi-view region embedding: inputs from a city, the peers' multi-task objectives, and one training loop.

The objectives are those of MVURE, reused by MGFN, HREP, HAFusion and ToPT's SREL. Two forms exist:

- ``authors`` (default; what the HAFusion and MVURE code computes): with M the mobility target
  (``od_target``, HAFusion's ``mob-adj.npy``, else ``od_flows``) divided by its mean, the sum over *all*
  N x N pairs of -M_ij log(softmax_j(e_s_i . e_d_j) + 1e-4), plus the same for destinations over
  origins; so each origin weighs by its trip volume and the mobility term dwarfs the similarity
  terms (cos(e_i, e_j) regressed on the POI and land-use similarities, mean squared error);
- ``distribution`` (this toolkit's first reading of the papers): per origin the cross-entropy between
  its row-normalised ``od_flows`` and the softmax, averaged over regions, and the same per destination;
  e_i . e_j regressed on the similarities.

The parts can be switched one at a time (:data:`OBJECTIVES`, ``objective={...}``) to see which matters.

Large cities (``sparse=True``) use sampled versions with O(N) memory: each origin keeps its top
destinations, scored against uniformly drawn negatives shared by all origins in an epoch, and
similarity pairs are drawn at random with cosine targets computed from the count views.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import sparse

from urbanprofile.data.city import CityData
from urbanprofile.embedders.base import Embedder, as_embedding
from urbanprofile.embedders.multiview.halo import NEGATIVE_WORDS, fit_batched
from urbanprofile.embedders.multiview.inputs import (
    NEGATIVES,
    SIMILARITY_PAIRS,
    TOP_DESTINATIONS,
    MultiViewInputs,
    TrainingLog,
    objective_settings,
    top_k_rows,
)
from urbanprofile.embedders.multiview.minibatch import check_mode, uses_minibatch
from urbanprofile.errors import MethodUnavailableError, TrainingError


class MultiTaskObjective:
    """The peers' multi-task loss on an embedding, with named parts (``mobility``, ``poi``, ``landuse``).

    Args:
        inputs: The city's arrays.
        views: Similarity views to reconstruct (a subset of ``poi``, ``landuse``).
        random_state: Seed of the negative and pair sampling (sparse mode).
        objective: A name in :data:`OBJECTIVES` or a dict of settings overriding ``authors``.
    """

    def __init__(self, inputs: MultiViewInputs, views: tuple[str, ...] = ("poi", "landuse"),
                 random_state: int | None = 0, objective: str | dict[str, Any] = "authors") -> None:
        settings = objective_settings(objective)
        self.settings = settings
        self.volume = settings["weighting"] == "volume"
        self.epsilon = float(settings["epsilon"])
        self.cosine = settings["similarity"] == "cosine"
        self.similarity_weight = float(settings["similarity_weight"])
        self.sparse = inputs.sparse
        self.views = views
        self.n = inputs.n_regions
        self.generator = torch.Generator().manual_seed(0 if random_state is None else int(random_state))
        use_target = settings["target"] == "od_target" and inputs.od_target is not None
        target = inputs.od_target if use_target else inputs.od
        if self.sparse:
            od = sparse.csr_matrix(target, dtype=float)
            # Volume weighting: entries over the mean of all N x N entries, as the dense form.
            scale = max(float(od.sum()) / self.n**2, 1e-12) if self.volume else None
            out_idx, out_w = top_k_rows(od, TOP_DESTINATIONS, scale)
            in_idx, in_w = top_k_rows(od.T.tocsr(), TOP_DESTINATIONS, scale)
            self.out_idx, self.out_w = torch.as_tensor(out_idx), torch.as_tensor(out_w, dtype=torch.float32)
            self.in_idx, self.in_w = torch.as_tensor(in_idx), torch.as_tensor(in_w, dtype=torch.float32)
            self.unit = {}
            for v in views:
                c = inputs.counts[v]
                unit = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
                self.unit[v] = torch.as_tensor(unit, dtype=torch.float32)
        else:
            od = np.asarray(target, dtype=float)
            if self.volume:
                mean = od.mean()
                weights = od / mean if mean > 0 else np.zeros_like(od)
                self.p_out = torch.as_tensor(weights, dtype=torch.float32)
                self.p_in = self.p_out
            else:
                out_total = od.sum(axis=1, keepdims=True)
                in_total = od.sum(axis=0, keepdims=True)
                self.p_out = torch.as_tensor(np.divide(od, out_total, out=np.zeros_like(od), where=out_total > 0),
                                             dtype=torch.float32)
                self.p_in = torch.as_tensor(np.divide(od, in_total, out=np.zeros_like(od), where=in_total > 0),
                                            dtype=torch.float32)
            self.has_out = torch.as_tensor(od.sum(axis=1) > 0)
            self.has_in = torch.as_tensor(od.sum(axis=0) > 0)
            self.similarity = {v: torch.as_tensor(np.array(inputs.similarity[v]), dtype=torch.float32)
                               for v in views}

    def _log_p(self, logits: Any, dim: int) -> Any:
        if self.epsilon > 0:
            return torch.log(torch.softmax(logits, dim=dim) + self.epsilon)
        return torch.log_softmax(logits, dim=dim)

    def _reduce(self, per_row: Any, mask: Any) -> Any:
        """Volume weighting sums over rows (rows weigh by their trips); else the mean over non-empty rows."""
        return per_row.sum() if self.volume else _masked_mean(per_row, mask)

    def mobility(self, source: Any, destination: Any) -> Any:
        """Cross-entropy of destinations per origin plus of origins per destination (KL up to a constant)."""
        if not self.sparse:
            logits = source @ destination.T
            out = -(self.p_out * self._log_p(logits, 1)).sum(dim=1)
            inn = -(self.p_in * self._log_p(logits, 0)).sum(dim=0)
            return self._reduce(out, self.has_out) + self._reduce(inn, self.has_in)
        return self._sampled(source, destination, self.out_idx, self.out_w) + self._sampled(
            destination, source, self.in_idx, self.in_w
        )

    def _sampled(self, query: Any, key: Any, idx: Any, weight: Any) -> Any:
        """Sampled softmax: each row's top entries against negatives shared by all rows this epoch."""
        negatives = torch.randint(0, self.n, (NEGATIVES,), generator=self.generator)
        pos = torch.einsum("nd,nmd->nm", query, key[idx])
        neg = query @ key[negatives].T + float(np.log(self.n / NEGATIVES))
        log_z = torch.logsumexp(torch.cat([pos, neg], dim=1), dim=1, keepdim=True)
        log_p = torch.log(torch.exp(pos - log_z) + self.epsilon) if self.epsilon > 0 else pos - log_z
        per_row = -(weight * log_p).sum(dim=1)
        return self._reduce(per_row, weight.sum(dim=1) > 0)

    def _pairs(self, a: Any, b: Any) -> Any:
        if self.cosine:
            return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)
        return (a * b).sum(dim=-1)

    def similarity_loss(self, view: str, embedding: Any) -> Any:
        """Mean squared error between cos(e_i, e_j) (or e_i . e_j) and the view's similarity s_ij, times
        the objective's ``similarity_weight``."""
        if not self.sparse:
            if self.cosine:
                unit = embedding / embedding.norm(dim=1, keepdim=True).clamp_min(1e-8)
                predicted = unit @ unit.T
            else:
                predicted = embedding @ embedding.T
            return self.similarity_weight * torch.mean((predicted - self.similarity[view]) ** 2)
        i = torch.arange(self.n).repeat_interleave(SIMILARITY_PAIRS)
        j = torch.randint(0, self.n, (self.n * SIMILARITY_PAIRS,), generator=self.generator)
        target = torch.einsum("pd,pd->p", self.unit[view][i], self.unit[view][j])
        return self.similarity_weight * torch.mean((self._pairs(embedding[i], embedding[j]) - target) ** 2)


def _masked_mean(values: Any, mask: Any) -> Any:
    return values[mask].mean() if bool(mask.any()) else values.sum() * 0.0


def train_loop(
    name: str,
    network: Any,
    step: Callable[[], dict[str, Any]],
    epochs: int,
    lr: float,
    weight_decay: float,
    checkpoints: tuple[int, ...] = (),
    on_epoch: Callable[[int, int], None] | None = None,
    clip: float | None = 5.0,
) -> TrainingLog:
    """Full-batch Adam on the sum of named loss parts, stopping with a one-line error on a NaN.

    Args:
        name: Method name, for error messages.
        network: The torch module; ``network()`` is the (N, d) embedding.
        step: Computes the named loss parts (``{"mobility": ..., "poi": ...}``).
        epochs: Number of epochs.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        checkpoints: Epochs whose embedding is kept in ``snapshots`` (label-free; a protocol may choose
            among them by inner cross-validation on training folds, never by test folds).
        on_epoch: Called with (epoch, epochs) after each epoch, e.g. to advance a progress bar.
        clip: Largest gradient norm (``None``: no clipping).
    """
    parameters = list(network.parameters())
    optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    log = TrainingLog()
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        optimizer.zero_grad()
        parts = step()
        for part, value in parts.items():
            if not torch.isfinite(value):
                raise TrainingError(
                    f"{name}: the {part} loss became {float(value.detach())} at epoch {epoch}; "
                    f"check the {part} view for degenerate values or lower the learning rate"
                )
        total = sum(parts.values())
        total.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(parameters, clip)
        optimizer.step()
        log.losses.append({k: float(v.detach()) for k, v in parts.items()})
        log.epochs = epoch
        if on_epoch is not None:
            on_epoch(epoch, epochs)
        if epoch in checkpoints:
            log.snapshots[epoch] = _embed(network)
    log.seconds = time.perf_counter() - start
    return log


def _embed(network: Any) -> np.ndarray:
    """The network's embedding with dropout off and no gradients; the network goes back to training mode."""
    network.eval()
    try:
        with torch.no_grad():
            return np.asarray(network().numpy(), dtype=float)
    finally:
        network.train()


class MultiViewEmbedder(Embedder):
    """Base of the transductive multi-view embedders: train on a city, embed that city's regions.

    Subclasses build a torch network from :class:`MultiViewInputs` and say which loss parts it trains
    on. ``fit`` trains for ``epochs`` epochs and keeps the final epoch's embedding; the embeddings at
    ``n_checkpoints`` evenly spaced epochs are kept too (``candidates_``), so that the ``nested`` and
    ``spatial`` protocols can choose the epoch by inner cross-validation on training folds only.
    """

    #: Evenly spaced epochs kept as candidate embeddings (the last is the final epoch).
    n_checkpoints: int = 5
    #: Called with (epoch, epochs) after each training epoch (the CLI sets it to drive a progress bar).
    on_epoch: Callable[[int, int], None] | None = None

    epochs: int
    lr: float
    weight_decay: float
    random_state: int | None
    #: The multi-task objective (a name in OBJECTIVES or a dict of settings); subclasses take it as a parameter.
    objective: str | dict[str, Any] = "authors"
    #: Training mode (``auto``, ``full``, ``minibatch``; see :mod:`.minibatch`), regions per mini-batch, and the
    #: city size above which ``auto`` trains in mini-batches; methods with a mini-batch mode take them as parameters.
    mode: str = "full"
    batch_size: int = 1024
    minibatch_above: int = 10_000
    negatives: int | str = 0
    #: Whether its mini-batches carry a halo (:mod:`.halo`: the full-batch method batched) or attend within the batch.
    minibatch_halo: bool = False
    #: Why a method has no mini-batch mode (one line for its error), or ``None`` when it has one.
    minibatch_unsupported: str | None = "it has no mini-batch mode"

    @property
    def required_views(self) -> tuple[str, ...]:
        """The count views this instance reads (its ``views`` argument; none for a method with its own inputs)."""
        return tuple(getattr(self, "views", ()))

    def inputs(self, city: CityData) -> MultiViewInputs:
        return MultiViewInputs.from_city(city, views=self.required_views)

    @abc.abstractmethod
    def build(self, city: CityData, inputs: MultiViewInputs) -> tuple[Any, Callable[[], dict[str, Any]]]:
        """Return (network, step): the torch module to train and a function computing the loss parts."""

    def build_minibatch(self, city: CityData, inputs: MultiViewInputs) -> tuple[Any, np.ndarray | None]:
        """Return (network, neighbours) for mini-batch training: ``network(batch)`` embeds a ``RegionBatch``, and
        an (N, k) neighbour table (itself first) restricts its attention, ``None`` for dense attention in a batch.

        Raises:
            MethodUnavailableError: The method has no mini-batch mode (:attr:`minibatch_unsupported` says why).
        """
        raise MethodUnavailableError(f"{type(self).__name__}: no mini-batch mode: {self.minibatch_unsupported}")

    def uses_minibatch(self, city: CityData) -> bool:
        """Whether ``fit`` on this city trains in mini-batches (validates the mode parameters).

        Raises:
            ParameterError: A bad ``mode``, ``batch_size`` or ``minibatch_above``.
            MethodUnavailableError: Mini-batches asked of a method without them.
        """

        name = type(self).__name__
        check_mode(name, self.mode, self.batch_size, self.minibatch_above, self.negatives,
                   NEGATIVE_WORDS if self.minibatch_halo else ())
        if self.minibatch_unsupported is not None:
            if self.mode == "minibatch":
                raise MethodUnavailableError(f"{name}: no mini-batch mode: {self.minibatch_unsupported}")
            return False
        return uses_minibatch(self.mode, city.n_regions, self.minibatch_above)

    def fit(self, city: CityData) -> MultiViewEmbedder:
        """Train on the city's views (never its targets)."""
        for view in self.required_views:
            city.view(view)
        if self.epochs < 1 or self.lr <= 0:
            raise ValueError(f"epochs must be >= 1 and lr > 0, got epochs={self.epochs}, lr={self.lr}")
        settings = objective_settings(self.objective)
        if self.uses_minibatch(city):

            fit_batched(self, city)
            return self
        torch.manual_seed(0 if self.random_state is None else int(self.random_state))
        inputs = self.inputs(city)
        network, step = self.build(city, inputs)
        name = type(self).__name__
        checkpoints = tuple(sorted({max(1, round(self.epochs * (k + 1) / self.n_checkpoints))
                                    for k in range(self.n_checkpoints)}))
        network.train()
        self.log_ = train_loop(name, network, step, self.epochs, self.lr, self.weight_decay, checkpoints,
                               self.on_epoch, clip=settings["clip"])
        values = self.log_.snapshots[self.epochs]
        for epoch, snapshot in self.log_.snapshots.items():
            if not np.isfinite(snapshot).all():
                raise TrainingError(f"{name}: the embedding has NaN values at epoch {epoch}")
        self.network_ = network
        self.embedding_ = as_embedding(values, city.region_ids)
        self.candidates_ = {f"epoch {e}": as_embedding(v, city.region_ids) for e, v in self.log_.snapshots.items()}
        return self

    def transform(self, city: CityData) -> pd.DataFrame:
        self._check_fitted("embedding_")
        if not city.region_ids.equals(self.embedding_.index):
            raise ValueError(f"{type(self).__name__} is transductive: transform the city it was fit on")
        return self.embedding_.copy()


def multitask_step(network: Any, heads: Any, objective: MultiTaskObjective,
                   mobility_only: bool = False) -> Callable[[], dict[str, Any]]:
    """The loss parts of one epoch: mobility from e_s/e_d, and each similarity view (unless ``mobility_only``)."""

    def step() -> dict[str, Any]:
        embedding = network()
        parts = {"mobility": objective.mobility(heads.source(embedding), heads.destination(embedding))}
        if not mobility_only:
            for view in objective.views:
                parts[view] = objective.similarity_loss(view, heads.similarity[view](embedding))
        return parts

    return step
