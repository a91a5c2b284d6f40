"""MVURE-style embedder (Zhang et al., IJCAI 2020): one region graph per view, graph attention per view,
cross-view information sharing and attentive fusion, trained with the multi-task objectives
(reimplemented from the paper)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from urbanprofile.data.city import CityData
from urbanprofile.embedders.multiview.inputs import MULTI_VIEWS, SIMILARITY_VIEWS, MultiViewInputs, cosine_similarity
from urbanprofile.embedders.multiview.layers import ReconstructionHeads, ViewEncoder, ViewFusion
from urbanprofile.embedders.multiview.minibatch import RegionBatch
from urbanprofile.embedders.multiview.spatial_graph import knn_from_similarity
from urbanprofile.embedders.multiview.training import MultiTaskObjective, MultiViewEmbedder, multitask_step
from urbanprofile.errors import ParameterError


def view_graphs(inputs: MultiViewInputs, k: int) -> dict[str, np.ndarray]:
    """The k-nearest graph of each view: mobility source/destination similarity (cosine of out-/in-flow
    profiles), and POI and land-use similarity when the city has those views."""
    od = np.asarray(inputs.od, dtype=float)
    graphs = {
        "source": knn_from_similarity(cosine_similarity(od), k),
        "destination": knn_from_similarity(cosine_similarity(od.T), k),
    }
    for view in inputs.similarity_views:  # POI and land use when the city has them
        graphs[view] = knn_from_similarity(inputs.similarity[view], k)
    return graphs


def nearest_by_cosine(vectors: np.ndarray, k: int) -> np.ndarray:
    """Each row's k nearest rows by cosine similarity (itself first), without an N x N matrix: a k-d tree search
    on the unit vectors, where the Euclidean order is the cosine order."""
    from sklearn.neighbors import NearestNeighbors

    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    k = min(k, len(unit))
    _, idx = NearestNeighbors(n_neighbors=k).fit(unit).kneighbors(unit)
    idx = idx.astype(np.int64)
    idx[:, 0] = np.arange(len(idx))  # a duplicate row may come first; the region itself leads, as in view_graphs
    return idx


def sparse_view_graphs(inputs: MultiViewInputs, k: int) -> dict[str, np.ndarray]:
    """The view graphs of a large city: cosine neighbours of the SVD out- and in-flow features (an approximation of
    the OD rows' cosine) and of the POI and land-use counts."""
    mobility = inputs.features["mobility"]
    half = mobility.shape[1] // 2
    graphs = {"source": nearest_by_cosine(mobility[:, :half], k),
              "destination": nearest_by_cosine(mobility[:, half:], k)}
    for view in inputs.similarity_views:
        graphs[view] = nearest_by_cosine(np.asarray(inputs.counts[view], dtype=float), k)
    return graphs


class MVURENetwork(nn.Module):
    """Graph attention per view graph -> cross-view sharing -> attentive fusion."""

    def __init__(self, features: dict[str, torch.Tensor], graphs: dict[str, torch.Tensor], d: int,
                 n_layers: int, n_heads: int, sharing: float, dropout: float) -> None:
        super().__init__()
        self.features = features
        self.graphs = graphs
        self.sharing = sharing
        self.encoders = nn.ModuleDict(
            {v: ViewEncoder(features[v].shape[1], d, n_layers, n_heads, dropout) for v in graphs}
        )
        self.fusion = ViewFusion(d, n_heads, mix_views=False, dropout=dropout)
        self.heads = ReconstructionHeads(d, tuple(v for v in SIMILARITY_VIEWS if v in features))

        #: Attention layers a region's output depends through (its halo, over the union of the view graphs).
        self.hops = n_layers

    def neighbor_table(self) -> np.ndarray:
        """The view graphs side by side, (N, views x k): a mini-batch's halo and its local graphs come from it."""
        return np.hstack([self.graphs[v].numpy() for v in self.graphs])

    def forward(self, batch: RegionBatch | None = None, row_weights: torch.Tensor | None = None,
                pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The (N, d) embedding, or a halo batch's (B, d) (its table: :meth:`neighbor_table`, remapped)."""
        if batch is None:
            views = [self.encoders[v](self.features[v], self.graphs[v]) for v in self.graphs]
        else:
            assert batch.neighbors is not None and batch.mask is not None
            rows = None if batch.rings is None else [batch.rings[self.hops - j] for j in range(1, self.hops + 1)]
            views = []
            start = 0
            for v, graph in self.graphs.items():
                columns = slice(start, start + graph.shape[1])
                start += graph.shape[1]
                views.append(self.encoders[v](self.features[v][batch.index], batch.neighbors[:, columns],
                                              batch.mask[:, columns], rows))
        total = torch.stack(views).sum(0)
        # Cross-view information sharing: each view mixes in the mean of the others.
        shared = [(1 - self.sharing) * z + self.sharing * (total - z) / (len(views) - 1) for z in views]
        weights = None if row_weights is None else row_weights[: shared[0].shape[0]]  # the rows left
        return self.fusion(shared, row_weights=weights, pooled=pooled)


class MVUREEmbedder(MultiViewEmbedder):
    """MVURE: multi-view graph attention over mobility, POI and land-use graphs.

    Args:
        d: Embedding width.
        n_layers: Graph attention layers per view.
        n_heads: Attention heads.
        k_neighbors: Neighbours of each region in each view graph.
        sharing: Weight of the other views in cross-view sharing.
        dropout: Dropout.
        epochs: Full-batch epochs (the final one is the embedding; checkpoints are candidates).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        objective: The multi-task objective (``distribution``, ``authors`` or a dict of settings).
        views: Count views read: ``od_flows`` (the mobility objective) and any of ``poi_counts``,
            ``landuse_counts`` (the registry passes those a city has).
        mode: ``full`` (the default), ``minibatch`` (:mod:`~urbanprofile.embedders.multiview.halo`: compact batches
            of seed regions with their trip partners, sampled negatives and their view-graph neighbourhoods as a
            halo; the seeds' rows of the full-batch loss) or ``auto`` (mini-batches above ``minibatch_above``).
            A large city (sparse OD view, or above 3,000 regions) takes SVD mobility features and view graphs from
            a nearest-neighbour search instead of dense similarities (:func:`sparse_view_graphs`).
        batch_size: Seed regions per mini-batch.
        minibatch_above: Largest city trained full-batch under ``auto``.
        negatives: Regions from outside a batch's seeds and trip partners that join its candidates: ``"auto"``
            (all of them up to 1,024, else 32 drawn), ``"all"`` or a count (see ``SRELEmbedder``).
        accumulate: Mini-batch mode: one optimizer step per epoch (with every region a candidate, the full-batch
            step); ``False``: a step per batch.
        random_state: Seed.
    """

    minibatch_unsupported = None
    #: Mini-batches carry the view-graph neighbourhood as a halo (:mod:`~urbanprofile.embedders.multiview.halo`).
    minibatch_halo = True

    def __init__(self, d: int = 144, n_layers: int = 2, n_heads: int = 4, k_neighbors: int = 10,
                 sharing: float = 0.2, dropout: float = 0.1, epochs: int = 500, lr: float = 5e-4,
                 weight_decay: float = 1e-5, objective: str | dict[str, Any] = "distribution",
                 views: tuple[str, ...] = MULTI_VIEWS, mode: str = "full", batch_size: int = 1024,
                 minibatch_above: int = 10_000, negatives: int | str = "auto", accumulate: bool = False,
                 random_state: int | None = 0) -> None:
        self.d = d
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.k_neighbors = k_neighbors
        self.sharing = sharing
        self.dropout = dropout
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.objective = objective
        self.views = views
        self.mode = mode
        self.batch_size = batch_size
        self.minibatch_above = minibatch_above
        self.negatives = negatives
        self.accumulate = accumulate
        self.random_state = random_state

    def uses_minibatch(self, city: CityData) -> bool:
        if not isinstance(self.accumulate, bool):
            raise ParameterError(f"MVUREEmbedder: accumulate must be True or False, got {self.accumulate!r}")
        return super().uses_minibatch(city)

    def _network(self, inputs: MultiViewInputs) -> MVURENetwork:
        mobility = inputs.features["mobility"]
        half = mobility.shape[1] // 2  # out-flow | in-flow profiles (OD rows and columns, or their SVD)
        features = {
            "source": torch.as_tensor(mobility[:, :half], dtype=torch.float32),
            "destination": torch.as_tensor(mobility[:, half:], dtype=torch.float32),
            **{v: torch.as_tensor(inputs.features[v], dtype=torch.float32) for v in inputs.similarity_views},
        }
        made = sparse_view_graphs if inputs.sparse else view_graphs
        graphs = {v: torch.as_tensor(g) for v, g in made(inputs, self.k_neighbors + 1).items()}
        return MVURENetwork(features, graphs, self.d, self.n_layers, self.n_heads, self.sharing, self.dropout)

    def build_minibatch(self, city: CityData, inputs: MultiViewInputs) -> tuple[Any, np.ndarray | None]:
        network = self._network(inputs)
        return network, network.neighbor_table()

    def build(self, city: CityData, inputs: MultiViewInputs) -> tuple[Any, Callable[[], dict[str, Any]]]:
        network = self._network(inputs)
        objective = MultiTaskObjective(inputs, views=inputs.similarity_views, random_state=self.random_state,
                                       objective=self.objective)
        return network, multitask_step(network, network.heads, objective)
