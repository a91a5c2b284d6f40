"""ToPT's spatial-aware region embedding learning (SREL): multi-view fusion, then Graphormer-style
inter-region attention with a distance bias and strength centrality (reimplemented from the paper)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from urbanprofile.data.city import CityData
from urbanprofile.embedders.multiview.inputs import MULTI_VIEWS, SIMILARITY_VIEWS, MultiViewInputs
from urbanprofile.embedders.multiview.layers import (
    MultiViewFusion,
    ReconstructionHeads,
    RegionBlock,
    SpatialBias,
    readout,
)
from urbanprofile.embedders.multiview.minibatch import RegionBatch, neighbourhood_prior
from urbanprofile.embedders.multiview.spatial_graph import N_BUCKETS, SpatialPrior, spatial_prior
from urbanprofile.embedders.multiview.training import MultiTaskObjective, MultiViewEmbedder, multitask_step
from urbanprofile.errors import ParameterError


class SRELNetwork(nn.Module):
    """H~ from the view fusion, + projected centrality -> L biased attention blocks -> read-out.

    With a sparse prior every attention (intra-view and inter-region) is restricted to each region's k
    nearest regions, so memory and time grow linearly with the number of regions.
    """

    def __init__(self, features: dict[str, torch.Tensor], prior: SpatialPrior, d: int, n_intra_layers: int,
                 n_layers: int, n_heads: int, spatial_weight: float, dropout: float,
                 readout_kind: str = "deepfc", feedforward: int | None = None) -> None:
        super().__init__()
        self.features = features
        self.adjacency = torch.as_tensor(prior.adjacency, dtype=torch.float32)
        self.buckets = torch.as_tensor(prior.buckets, dtype=torch.long)
        self.neighbors = None if prior.neighbors is None else torch.as_tensor(prior.neighbors, dtype=torch.long)
        self.centrality = torch.as_tensor(prior.centrality, dtype=torch.float32)[:, None]
        self.views = MultiViewFusion({v: x.shape[1] for v, x in features.items()}, d, n_intra_layers, n_heads,
                                     dropout, feedforward)
        self.centrality_projection = nn.Linear(1, d)
        self.bias = SpatialBias(n_heads, N_BUCKETS, spatial_weight)
        self.blocks = nn.ModuleList(RegionBlock(d, n_heads, dropout, feedforward=feedforward)
                                    for _ in range(n_layers))
        self.out = readout(readout_kind, d, d)
        self.heads = ReconstructionHeads(d, tuple(v for v in SIMILARITY_VIEWS if v in features))
        #: Attention layers a region's output depends through: the receptive field is this many neighbourhood hops.
        self.hops = n_intra_layers + n_layers

    def forward(self, batch: RegionBatch | None = None, row_weights: torch.Tensor | None = None,
                pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The (N, d) embedding, or with a mini-batch the (B, d) embedding of its regions (attention within it).

        A batch that holds its regions' ``hops``-hop neighbourhood (a halo) gives its inner regions their full-batch
        outputs, given the view fusion's pooled scores (``row_weights`` or ``pooled``, see :class:`ViewFusion`).
        """
        if batch is None:
            h = self.views(self.features, self.neighbors) + self.centrality_projection(self.centrality)
            bias = self.bias(self.adjacency, self.buckets)
            for block in self.blocks:
                h = block(h, self.neighbors, bias)
            return self.out(h)
        index = batch.index
        features = {v: x[index] for v, x in self.features.items()}
        rings, n_intra = batch.rings, self.hops - len(self.blocks)
        # With rings, layer j outputs only the regions within hops - j steps of the targets (all the next reads).
        view_rows = None if rings is None else [rings[self.hops - j] for j in range(1, n_intra + 1)]
        h = self.views(features, batch.neighbors, batch.mask, rows=view_rows, row_weights=row_weights, pooled=pooled)
        inner = index[: h.shape[0]]
        h = h + self.centrality_projection(self.centrality[inner])
        bias = self.bias(self.adjacency[inner], self.buckets[inner])
        for j, block in enumerate(self.blocks, start=1):
            if rings is None or batch.neighbors is None or batch.mask is None:
                h = block(h, batch.neighbors, bias, batch.mask)
            else:
                r = rings[self.hops - n_intra - j]
                h = block(h, batch.neighbors[:r], bias[:, :r], batch.mask[:r])
        return self.out(h)


class SRELEmbedder(MultiViewEmbedder):
    """ToPT's SREL region embedder (task-agnostic stage).

    Args:
        d: Embedding width (paper: 144).
        n_intra_layers: Intra-view region attention blocks per view.
        n_layers: Graphormer-style blocks (paper: 2 to 5).
        n_heads: Attention heads.
        spatial_weight: lambda, the weight of the spatial bias (paper: 0.1 to 0.4).
        dropout: Dropout.
        epochs: Full-batch epochs; the final epoch's embedding is the embedding, and evenly spaced
            checkpoints are candidates a protocol may choose among by inner CV on training folds.
        lr: Adam learning rate (paper: 2e-4 to 8e-4).
        weight_decay: Adam weight decay (the authors' 5e-4).
        objective: The multi-task objective shared with HAFusion (``authors``, ``distribution`` or a dict).
        readout: ``deepfc`` (HAFusion's code) or ``mlp``.
        feedforward: Hidden width of a ReLU feed-forward with dropout in every attention block (HAFusion's
            2048, the ``hafusion`` default); ``None``: the 2 d GELU feed-forward.
        attention: ``auto`` (dense up to ``dense_limit`` regions, else sparse), ``dense`` or ``sparse``, in both
            modes (a mini-batch with dense attention runs the whole city's forward for its halo).
        k_neighbors: Neighbourhood size of the sparse attention.
        dense_limit: Largest city trained with dense N x N attention under ``auto``.
        views: Count views read: ``od_flows`` (the mobility objective) and any of ``poi_counts``,
            ``landuse_counts`` (the registry passes those a city has).
        mode: ``auto`` (mini-batches above ``minibatch_above`` regions, else full batch), ``full`` or
            ``minibatch`` (:mod:`~urbanprofile.embedders.multiview.halo`: spatially compact batches of seed regions
            with their trip partners, sampled negatives and the attention neighbourhood of those as a halo, so the
            seeds' outputs are the full-batch ones; the loss is the seeds' rows of the full-batch loss).
        batch_size: Seed regions per mini-batch.
        minibatch_above: Largest city trained full-batch under ``auto`` (the sparse full-batch form took 8.3 GB
            at 20,000 regions).
        negatives: Regions from outside each mini-batch's seeds and trip partners that join its candidates, for
            its softmax and similarity sums. ``"auto"``: all of them when they are at most 1,024 (``EXACT_REST``: the
            batch's loss is exactly its seeds' rows of the full-batch loss), else 32 drawn uniformly (weighted as a
            sample of the rest of the city); ``"all"``: always all of them; a count ``M``: ``M`` drawn uniformly
            (all of the rest when it has no more regions than ``M``).
        accumulate: Mini-batch mode: one optimizer step per epoch on the gradients summed over its batches (with
            every region a candidate, the full-batch step); ``False``: a step per batch (the fast path).
        random_state: Seed of the initialisation and sampling.
    """

    def __init__(self, d: int = 144, n_intra_layers: int = 1, n_layers: int = 2, n_heads: int = 4,
                 spatial_weight: float = 0.3, dropout: float = 0.1, epochs: int = 500, lr: float = 5e-4,
                 weight_decay: float = 5e-4, objective: str | dict[str, Any] = "authors", readout: str = "deepfc",
                 attention: str = "auto", k_neighbors: int = 32, dense_limit: int = 2000,
                 feedforward: int | None = None, views: tuple[str, ...] = MULTI_VIEWS, mode: str = "auto",
                 batch_size: int = 1024, minibatch_above: int = 10_000, negatives: int | str = "auto",
                 accumulate: bool = False, random_state: int | None = 0) -> None:
        self.d = d
        self.n_intra_layers = n_intra_layers
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.spatial_weight = spatial_weight
        self.dropout = dropout
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.objective = objective
        self.readout = readout
        self.attention = attention
        self.k_neighbors = k_neighbors
        self.dense_limit = dense_limit
        self.feedforward = feedforward
        self.views = views
        self.mode = mode
        self.batch_size = batch_size
        self.minibatch_above = minibatch_above
        self.negatives = negatives
        self.accumulate = accumulate
        self.random_state = random_state

    minibatch_unsupported = None
    #: Mini-batches carry their attention neighbourhood as a halo (:mod:`~urbanprofile.embedders.multiview.halo`).
    minibatch_halo = True

    def uses_minibatch(self, city: CityData) -> bool:
        if not isinstance(self.accumulate, bool):
            raise ParameterError(f"SRELEmbedder: accumulate must be True or False, got {self.accumulate!r}")
        return super().uses_minibatch(city)

    def _sparse(self, city: CityData) -> bool:
        if self.attention not in ("auto", "dense", "sparse"):
            raise ValueError(f"attention must be 'auto', 'dense' or 'sparse', got {self.attention!r}")
        return self.attention == "sparse" or (self.attention == "auto" and city.n_regions > self.dense_limit)

    def inputs(self, city: CityData) -> MultiViewInputs:
        return MultiViewInputs.from_city(city, sparse_mode=self._sparse(city), views=self.required_views)

    def build(self, city: CityData, inputs: MultiViewInputs) -> tuple[Any, Callable[[], dict[str, Any]]]:
        prior = spatial_prior(city, k=self.k_neighbors if self._sparse(city) else None,
                              dense_limit=city.n_regions if not self._sparse(city) else 0)
        self.prior_source_ = prior.source
        features = {v: torch.as_tensor(x, dtype=torch.float32) for v, x in inputs.features.items()}
        network = SRELNetwork(features, prior, self.d, self.n_intra_layers, self.n_layers, self.n_heads,
                              self.spatial_weight, self.dropout, self.readout, self.feedforward)
        objective = MultiTaskObjective(inputs, views=inputs.similarity_views, random_state=self.random_state,
                                       objective=self.objective)
        return network, multitask_step(network, network.heads, objective)

    def build_minibatch(self, city: CityData, inputs: MultiViewInputs) -> tuple[Any, np.ndarray | None]:
        if self._sparse(city):
            prior = neighbourhood_prior(city, inputs, self.k_neighbors)
        else:
            # Dense attention, as the full-batch form of a city this small: every batch's halo is the city.
            prior = spatial_prior(city, dense_limit=city.n_regions)
        self.prior_source_ = prior.source
        features = {v: torch.as_tensor(x, dtype=torch.float32) for v, x in inputs.features.items()}
        network = SRELNetwork(features, prior, self.d, self.n_intra_layers, self.n_layers, self.n_heads,
                              self.spatial_weight, self.dropout, self.readout, self.feedforward)
        return network, prior.neighbors
