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
from urbanprofile.embedders.multiview.spatial_graph import knn_from_similarity
from urbanprofile.embedders.multiview.training import MultiTaskObjective, MultiViewEmbedder, multitask_step


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

    def forward(self) -> torch.Tensor:
        views = [self.encoders[v](self.features[v], self.graphs[v]) for v in self.graphs]
        total = torch.stack(views).sum(0)
        # Cross-view information sharing: each view mixes in the mean of the others.
        shared = [(1 - self.sharing) * z + self.sharing * (total - z) / (len(views) - 1) for z in views]
        return self.fusion(shared)


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
        mode: ``full`` (or ``auto``, the same); ``minibatch`` is refused with the reason in
            :attr:`minibatch_unsupported`.
        random_state: Seed.
    """

    minibatch_unsupported = ("its view graphs are the k nearest regions in dense N x N similarity matrices and its "
                             "mobility features are whole OD rows (N x 2N); not ported to mini-batches")

    def __init__(self, d: int = 144, n_layers: int = 2, n_heads: int = 4, k_neighbors: int = 10,
                 sharing: float = 0.2, dropout: float = 0.1, epochs: int = 500, lr: float = 5e-4,
                 weight_decay: float = 1e-5, objective: str | dict[str, Any] = "distribution",
                 views: tuple[str, ...] = MULTI_VIEWS, mode: str = "full",
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
        self.random_state = random_state

    def build(self, city: CityData, inputs: MultiViewInputs) -> tuple[Any, Callable[[], dict[str, Any]]]:
        n = inputs.n_regions
        mobility = inputs.features["mobility"]
        features = {
            "source": torch.as_tensor(mobility[:, :n], dtype=torch.float32),
            "destination": torch.as_tensor(mobility[:, n:], dtype=torch.float32),
            **{v: torch.as_tensor(inputs.features[v], dtype=torch.float32) for v in inputs.similarity_views},
        }
        graphs = {v: torch.as_tensor(g) for v, g in view_graphs(inputs, self.k_neighbors + 1).items()}
        network = MVURENetwork(features, graphs, self.d, self.n_layers, self.n_heads, self.sharing, self.dropout)
        objective = MultiTaskObjective(inputs, views=inputs.similarity_views, random_state=self.random_state,
                                       objective=self.objective)
        return network, multitask_step(network, network.heads, objective)
