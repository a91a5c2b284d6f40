"""Mini-batch training of the multi-view embedders: spatially compact batches, attention and losses within them.

A full-batch epoch embeds every region at once, and HAFusion's inter-region attention and the peers' losses
run over all N x N pairs. In mini-batch mode an epoch is one pass over compact batches of at most
``batch_size`` regions, in the spirit of Cluster-GCN (Chiang et al., KDD 2019): a k-d split of the region
centroids, rotated by a seeded random angle every epoch so that batch borders move (a city without locations
is split on its first two mobility SVD components). Within a batch:

- attention is over the batch: HAFusion attends densely over the batch's regions (SREL, whose attention is local,
  trains with halos instead: :mod:`.halo`, the full-batch method batched; dense attention has the whole city as
  its halo, so HAFusion keeps this in-batch form);
- the mobility loss is the peers' softmax of e_s . e_d with the batch's regions as the candidate
  destinations (and origins): a sampled softmax whose negatives are the batch's other regions, scored on
  the trips between regions of the batch (the OD slice of the batch, read from a sparse matrix);
- the similarity losses are over the batch's pairs;
- optionally (``negatives``) regions drawn uniformly from the rest of the city join each batch, as context for
  its attention and as candidates of its losses (their own outputs are not kept).

Memory is O(batch_size^2 + N k) and an epoch is N / batch_size steps, so its time is linear in N. With
``batch_size`` of at least N one batch is the whole city and the step is the full-batch step. Batch embeddings
(checkpoints, the final embedding) use the unrotated split.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import sparse

from urbanprofile.data.city import SPARSE_VIEW_ABOVE, CityData, is_sparse_view
from urbanprofile.embedders.base import as_embedding
from urbanprofile.embedders.multiview.inputs import (
    MultiViewInputs,
    TrainingLog,
    mobility_svd,
    objective_settings,
    top_k_rows,
)
from urbanprofile.embedders.multiview.spatial_graph import N_BUCKETS, SpatialPrior, spatial_prior
from urbanprofile.errors import ParameterError, TrainingError

#: Training modes of the multi-view embedders: ``auto`` is mini-batch above the method's region threshold.
MODES = ("auto", "full", "minibatch")


def check_mode(name: str, mode: str, batch_size: Any, minibatch_above: Any, negatives: Any = 0,
               negative_words: tuple[str, ...] = ()) -> None:
    """Validate the mini-batch parameters of a method, with one-line errors.

    Args:
        name: The method, for the messages.
        mode, batch_size, minibatch_above, negatives: Its parameters.
        negative_words: Words ``negatives`` may be besides a count (the halo form's ``auto`` and ``all``).

    Raises:
        ParameterError: On an unknown mode, a batch size below 2, or a negative threshold or count of negatives.
    """
    if mode not in MODES:
        raise ParameterError(f"{name}: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 2:
        raise ParameterError(f"{name}: batch_size must be an integer of at least 2 regions, got {batch_size!r}")
    if isinstance(minibatch_above, bool) or not isinstance(minibatch_above, int | np.integer) or minibatch_above < 0:
        raise ParameterError(f"{name}: minibatch_above must be an integer >= 0 regions, got {minibatch_above!r}")
    if isinstance(negatives, str) and negatives in negative_words:
        return
    if isinstance(negatives, bool) or not isinstance(negatives, int | np.integer) or negatives < 0:
        words = "".join(f" or {word!r}" for word in negative_words)
        raise ParameterError(f"{name}: negatives must be an integer >= 0 regions{words}, got {negatives!r}")


def uses_minibatch(mode: str, n_regions: int, minibatch_above: int) -> bool:
    """Whether a city of ``n_regions`` trains in mini-batches under ``mode``."""
    return mode == "minibatch" or (mode == "auto" and n_regions > minibatch_above)


def minibatch_inputs(city: CityData, views: tuple[str, ...]) -> MultiViewInputs:
    """The inputs of a mini-batch fit: the full-batch ones for a small city, the sparse ones for a large city.

    A small city keeps the same features and similarity targets as its full-batch fit, so the two modes
    differ by the batching only; a large city (sparse OD view, or more than ``SPARSE_VIEW_ABOVE`` regions)
    gets SVD mobility features and cosine targets computed per batch from the count views.
    """
    od = city.view("od_flows")
    large = city.n_regions > SPARSE_VIEW_ABOVE or is_sparse_view(od)
    return MultiViewInputs.from_city(city, sparse_mode=large, views=views)


def batch_coordinates(city: CityData, inputs: MultiViewInputs) -> np.ndarray:
    """Where regions lie for the batch split: centroids in km, else the first mobility SVD component pair."""
    if city.has_locations:
        return city.coordinates_km()
    od = inputs.od if sparse.issparse(inputs.od) else sparse.csr_matrix(np.asarray(inputs.od, dtype=float))
    return mobility_svd(sparse.csr_matrix(od), 1)


def compact_batches(xy: np.ndarray, batch_size: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Split regions into spatially compact batches of at most ``batch_size`` (sizes differ by at most one or so).

    A k-d split: each part is cut at the quantile that gives both sides a whole number of batches, along its
    wider axis. With ``rng`` the coordinates are first rotated by a random angle and the batches shuffled, so
    every epoch has other borders; without it the split is fixed (used to embed).
    """
    n = len(xy)
    points = np.asarray(xy, dtype=float)
    if rng is not None:
        angle = rng.uniform(0, np.pi)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = points @ rotation.T
    batches: list[np.ndarray] = []
    stack = [np.arange(n)]
    while stack:
        part = stack.pop()
        n_batches = math.ceil(len(part) / batch_size)
        if n_batches <= 1:
            batches.append(np.sort(part))
            continue
        coords = points[part]
        axis = int(np.argmax(coords.max(axis=0) - coords.min(axis=0)))
        left = round(len(part) * (n_batches // 2) / n_batches)
        # A stable order along the axis (ties broken by index) keeps the split deterministic.
        order = np.lexsort((part, coords[:, axis]))
        stack.append(part[order[left:]])
        stack.append(part[order[:left]])
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def with_self_first(neighbors: np.ndarray) -> np.ndarray:
    """A neighbour table whose column 0 is the region itself (so a masked row always keeps one entry)."""
    table = np.array(neighbors, dtype=np.int64, copy=True)
    table[:, 0] = np.arange(len(table))
    return table


def neighbourhood_prior(city: CityData, inputs: MultiViewInputs, k: int) -> SpatialPrior:
    """SREL's sparse spatial prior for mini-batches: the k nearest centroids, else the k strongest trip partners.

    Unlike :func:`~urbanprofile.embedders.multiview.spatial_graph.spatial_prior`, a city without locations
    never gets an N x N proximity: its neighbours are read row by row from the sparse OD matrix (trips both
    ways, log1p, divided by the largest), and a region with fewer than k - 1 partners has -1 (masked) slots.
    """
    if city.has_locations:
        prior = spatial_prior(city, k=k)
        assert prior.neighbors is not None
        prior.neighbors = with_self_first(prior.neighbors)
        return prior
    od = sparse.csr_matrix(inputs.od if sparse.issparse(inputs.od) else np.asarray(inputs.od, dtype=float))
    both = (od + od.T).tocsr()
    both.setdiag(0)
    both.eliminate_zeros()
    both.data = np.log1p(both.data)
    top = float(both.data.max()) if both.nnz else 1.0
    k = max(1, min(k, city.n_regions))
    idx, weight = top_k_rows(both, max(k - 1, 1), scale=top)
    idx, weight = idx[:, : k - 1], weight[:, : k - 1]
    neighbors = np.column_stack([np.arange(city.n_regions), np.where(weight > 0, idx, -1)]).astype(np.int64)
    adjacency = np.column_stack([np.ones(city.n_regions), weight])
    present = adjacency[:, 1:][neighbors[:, 1:] >= 0]
    edges = np.quantile(-present, np.linspace(0, 1, N_BUCKETS + 1)[1:-1]) if present.size else np.zeros(N_BUCKETS - 1)
    buckets = np.searchsorted(edges, -adjacency).astype(np.int64)
    buckets[:, 0] = 0
    strength = adjacency[:, 1:].sum(axis=1)
    centrality = strength / strength.max() if strength.max() > 0 else strength
    return SpatialPrior(adjacency, buckets, neighbors, centrality, f"{k - 1} strongest trip partners (mini-batch)")


@dataclass
class RegionBatch:
    """One mini-batch: its regions and, for neighbourhood attention, their neighbours inside it.

    Attributes:
        index: (B,) global positions of the batch's regions.
        neighbors: (B, k) positions within the batch of each region's neighbours (0 where masked), or ``None``.
        mask: (B, k) which neighbours lie in the batch, or ``None``.
        rings: For a halo batch (:mod:`.halo`), how many of its regions (they come nearest first) lie within
            0, 1, 2, ... neighbourhood steps of its targets; ``None`` otherwise.
    """

    index: torch.Tensor
    neighbors: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    rings: list[int] | None = None


class BatchMaker:
    """Turns global positions into :class:`RegionBatch` es, remapping a global (N, k) neighbour table."""

    def __init__(self, n_regions: int, neighbors: np.ndarray | None) -> None:
        self.neighbors = None if neighbors is None else torch.as_tensor(neighbors, dtype=torch.long)
        # One reusable position map instead of an N-sized allocation per batch.
        self.position = torch.full((n_regions,), -1, dtype=torch.long) if neighbors is not None else None

    def __call__(self, index: np.ndarray) -> RegionBatch:
        idx = torch.as_tensor(index, dtype=torch.long)
        if self.neighbors is None or self.position is None:
            return RegionBatch(idx)
        self.position[idx] = torch.arange(len(idx))
        globals_ = self.neighbors[idx]
        # -1 marks a missing neighbour (a region with fewer partners than k).
        local = torch.where(globals_ >= 0, self.position[globals_.clamp_min(0)], -1)
        self.position[idx] = -1
        mask = local >= 0
        return RegionBatch(idx, local.clamp_min(0), mask)


class MiniBatchObjective:
    """The peers' multi-task loss restricted to a batch's regions (the sampled form of ``MultiTaskObjective``).

    Args:
        inputs: The city's arrays (dense for a small city, sparse for a large one).
        views: Similarity views to reconstruct.
        objective: A name in ``OBJECTIVES`` or a dict of settings.
    """

    def __init__(self, inputs: MultiViewInputs, views: tuple[str, ...], objective: str | dict[str, Any]) -> None:
        settings = objective_settings(objective)
        self.volume = settings["weighting"] == "volume"
        self.epsilon = float(settings["epsilon"])
        self.cosine = settings["similarity"] == "cosine"
        self.similarity_weight = float(settings["similarity_weight"])
        self.views = views
        self.n = inputs.n_regions
        use_target = settings["target"] == "od_target" and inputs.od_target is not None
        raw = inputs.od_target if use_target else inputs.od
        target = sparse.csr_matrix(raw, dtype=float)
        out_total = np.asarray(target.sum(axis=1)).ravel()
        in_total = np.asarray(target.sum(axis=0)).ravel()
        self.has_out = torch.as_tensor(out_total > 0)
        self.has_in = torch.as_tensor(in_total > 0)
        if self.volume:
            # Entries over the mean of all N x N entries, as the full-batch form.
            mean = float(target.sum()) / self.n**2
            self.p_out = target / mean if mean > 0 else target * 0.0
            self.p_in = self.p_out
        else:
            self.p_out = sparse.diags(1.0 / np.where(out_total > 0, out_total, 1.0)) @ target
            self.p_in = target @ sparse.diags(1.0 / np.where(in_total > 0, in_total, 1.0))
        self.p_out, self.p_in = sparse.csr_matrix(self.p_out), sparse.csr_matrix(self.p_in)
        self.similarity = {v: np.asarray(inputs.similarity[v], dtype=np.float32) for v in views
                           if v in inputs.similarity}
        self.unit = {}
        for v in views:
            if v in self.similarity:
                continue
            counts = np.asarray(inputs.counts[v], dtype=float)
            unit = counts / np.maximum(np.linalg.norm(counts, axis=1, keepdims=True), 1e-12)
            self.unit[v] = torch.as_tensor(unit, dtype=torch.float32)

    def _log_p(self, logits: torch.Tensor, dim: int) -> torch.Tensor:
        """log of the softmax over the batch, rescaled by B / N to stand for the softmax over all N regions."""
        shift = math.log(logits.shape[dim] / self.n)
        if self.epsilon > 0:
            return torch.log(torch.softmax(logits, dim=dim) * math.exp(shift) + self.epsilon)
        return torch.log_softmax(logits, dim=dim) + shift

    def mobility(self, index: np.ndarray, source: torch.Tensor, destination: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of destinations per origin plus of origins per destination, within the batch."""
        logits = source @ destination.T
        p_out = torch.as_tensor(self.p_out[index][:, index].toarray(), dtype=torch.float32)
        p_in = p_out if self.p_in is self.p_out else torch.as_tensor(self.p_in[index][:, index].toarray(),
                                                                        dtype=torch.float32)
        out = -(p_out * self._log_p(logits, 1)).sum(dim=1)
        inn = -(p_in * self._log_p(logits, 0)).sum(dim=0)
        if self.volume:
            # The batch's share of the full sum, scaled by N / B so the mobility term keeps its full-batch
            # weight against the similarity terms (means, whatever the batch).
            return (out.sum() + inn.sum()) * (self.n / len(index))
        idx = torch.as_tensor(index, dtype=torch.long)
        return _masked_mean(out, self.has_out[idx]) + _masked_mean(inn, self.has_in[idx])

    def similarity_loss(self, view: str, index: np.ndarray, embedding: torch.Tensor) -> torch.Tensor:
        """Mean squared error between cos(e_i, e_j) (or e_i . e_j) and the view's similarity, over the batch's pairs."""
        if view in self.similarity:
            target = torch.as_tensor(self.similarity[view][np.ix_(index, index)])
        else:
            unit = self.unit[view][torch.as_tensor(index, dtype=torch.long)]
            target = unit @ unit.T
        if self.cosine:
            normed = embedding / embedding.norm(dim=1, keepdim=True).clamp_min(1e-8)
            predicted = normed @ normed.T
        else:
            predicted = embedding @ embedding.T
        return self.similarity_weight * torch.mean((predicted - target) ** 2)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return values[mask].mean() if bool(mask.any()) else values.sum() * 0.0


def with_negatives(index: np.ndarray, n_regions: int, negatives: int, rng: np.random.Generator) -> np.ndarray:
    """A batch followed by up to ``negatives`` regions drawn uniformly from outside it (distinct, seeded)."""
    if negatives <= 0 or len(index) >= n_regions:
        return index
    inside = np.zeros(n_regions, dtype=bool)  # O(N) booleans per step, small beside a step's work
    inside[index] = True
    drawn = rng.integers(0, n_regions, size=2 * negatives + 16)
    drawn = drawn[~inside[drawn]]
    _, first = np.unique(drawn, return_index=True)
    extra = drawn[np.sort(first)][:negatives]
    return np.concatenate([index, extra])


def _embed_all(network: Any, batches: list[np.ndarray], make: BatchMaker, n_regions: int, negatives: int,
               seed: int) -> np.ndarray:
    """Every region's embedding, batch by batch, with dropout off and no gradients (the same negatives each time)."""
    rng = np.random.default_rng([seed, 1])
    network.eval()
    try:
        out: np.ndarray | None = None
        with torch.no_grad():
            for index in batches:
                values = network(make(with_negatives(index, n_regions, negatives, rng))).numpy()
                if out is None:
                    out = np.empty((n_regions, values.shape[1]), dtype=np.float32)
                out[index] = values[: len(index)]
        assert out is not None
        return out
    finally:
        network.train()


class BatchedRun:
    """What both mini-batch forms share (:func:`fit_minibatch`, :func:`.halo.fit_halo`): the seeded set-up, the
    optimizer and log, the loss checks, the early stop of ``max_steps``, checkpoints and the fitted attributes.

    The set-up keeps one order, so the same seed gives the same network: torch seeded, the NumPy generator, the
    inputs, then the network (``build_minibatch``).
    """

    def __init__(self, embedder: Any, city: CityData, max_steps: int | None) -> None:
        self.embedder, self.city, self.max_steps = embedder, city, max_steps
        self.name = type(embedder).__name__
        self.settings = objective_settings(embedder.objective)
        self.seed = 0 if embedder.random_state is None else int(embedder.random_state)
        torch.manual_seed(self.seed)
        self.rng = np.random.default_rng(self.seed)
        self.inputs = minibatch_inputs(city, embedder.required_views)
        self.network, self.neighbors = embedder.build_minibatch(city, self.inputs)
        self.xy = batch_coordinates(city, self.inputs)
        self.batch_size = int(embedder.batch_size)
        # A word (the halo form's "auto" or "all", checked by check_mode) or a count.
        self.negatives: int | str = (embedder.negatives if isinstance(embedder.negatives, str)
                                     else int(embedder.negatives))
        self.epochs = embedder.epochs
        self.checkpoints = {max(1, round(self.epochs * (k + 1) / embedder.n_checkpoints))
                            for k in range(embedder.n_checkpoints)}
        self.parameters = list(self.network.parameters())
        self.optimizer = torch.optim.Adam(self.parameters, lr=embedder.lr, weight_decay=embedder.weight_decay)
        self.log = TrainingLog()
        self.embed_batches = compact_batches(self.xy, self.batch_size)
        self.start = time.perf_counter()
        self.steps = 0
        self.network.train()

    def epoch_batches(self) -> list[np.ndarray]:
        """This epoch's spatially compact batches, re-drawn from the seeded generator."""
        batches = compact_batches(self.xy, self.batch_size, self.rng)
        self.log.steps_per_epoch = len(batches)
        return batches

    def check(self, parts: dict[str, Any], epoch: int) -> None:
        for part, value in parts.items():
            if not torch.isfinite(value):
                raise TrainingError(
                    f"{self.name}: the {part} loss became {float(value.detach())} at epoch {epoch} (mini-batch); "
                    f"check the {part} view for degenerate values or lower the learning rate"
                )

    def optimizer_step(self) -> None:
        if self.settings["clip"] is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.settings["clip"])
        self.optimizer.step()

    def stepped(self, epoch_start: float) -> bool:
        """Count a step; ``True`` when ``max_steps`` is reached (the partial epoch and ``log_`` are recorded)."""
        self.steps += 1
        if self.max_steps is None or self.steps < self.max_steps:
            return False
        self.log.epoch_seconds.append(time.perf_counter() - epoch_start)
        self.log.seconds = time.perf_counter() - self.start
        self.embedder.log_ = self.log
        return True

    def end_epoch(self, epoch: int, totals: dict[str, float], epoch_start: float,
                  embed_all: Callable[[], np.ndarray]) -> None:
        self.log.losses.append(totals)
        self.log.epoch_seconds.append(time.perf_counter() - epoch_start)
        self.log.epochs = epoch
        if self.embedder.on_epoch is not None:
            self.embedder.on_epoch(epoch, self.epochs)
        if epoch in self.checkpoints:
            self.log.snapshots[epoch] = embed_all()

    def finish(self) -> None:
        """Check the checkpoints and set the embedder's fitted attributes."""
        log, embedder = self.log, self.embedder
        log.seconds = time.perf_counter() - self.start
        for epoch, snapshot in log.snapshots.items():
            if not np.isfinite(snapshot).all():
                raise TrainingError(f"{self.name}: the embedding has NaN values at epoch {epoch} (mini-batch)")
        embedder.log_ = log
        embedder.network_ = self.network
        embedder.candidates_ = {f"epoch {e}": as_embedding(v, self.city.region_ids) for e, v in log.snapshots.items()}
        embedder.embedding_ = embedder.candidates_[f"epoch {self.epochs}"]


def fit_minibatch(embedder: Any, city: CityData, max_steps: int | None = None) -> None:
    """Train ``embedder`` on ``city`` in mini-batches and set its fitted attributes (``log_``, ``embedding_``, ...).

    ``max_steps`` stops the run after that many steps in all, part way through an epoch, and then sets only
    ``log_`` (its ``epoch_seconds`` holds the partial epoch): a way to time an epoch of a very large city from
    its first steps (``benchmarks/minibatch.py``); nothing is embedded.

    The embedder provides ``build_minibatch(city, inputs) -> (network, neighbours)``: a network whose
    ``network(batch)`` embeds a :class:`RegionBatch`, and a global (N, k) neighbour table (``None`` for dense
    attention within the batch).
    """
    run = BatchedRun(embedder, city, max_steps)
    objective = MiniBatchObjective(run.inputs, run.inputs.similarity_views, embedder.objective)
    make = BatchMaker(city.n_regions, run.neighbors)
    negatives = int(run.negatives)  # in-batch methods take a count only (check_mode)
    for epoch in range(1, run.epochs + 1):
        epoch_start = time.perf_counter()
        totals: dict[str, float] = {}
        batches = run.epoch_batches()
        for index in batches:
            run.optimizer.zero_grad()
            parts = _step(run.network, objective, make, with_negatives(index, city.n_regions, negatives, run.rng))
            run.check(parts, epoch)
            sum(parts.values()).backward()
            run.optimizer_step()
            for part, value in parts.items():
                totals[part] = totals.get(part, 0.0) + float(value.detach()) / len(batches)
            if run.stepped(epoch_start):
                return
        run.end_epoch(epoch, totals, epoch_start, lambda: _embed_all(run.network, run.embed_batches, make,
                                                                      city.n_regions, negatives, run.seed))
    run.finish()


def _step(network: Any, objective: MiniBatchObjective, make: BatchMaker, index: np.ndarray) -> dict[str, Any]:
    embedding = network(make(index))
    heads = network.heads
    parts = {"mobility": objective.mobility(index, heads.source(embedding), heads.destination(embedding))}
    for view in objective.views:
        parts[view] = objective.similarity_loss(view, index, heads.similarity[view](embedding))
    return parts
