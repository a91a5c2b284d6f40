"""HAFusion-class embedder (Sun et al., ICDE 2024): intra-view and inter-view attentive fusion, then
inter-region self-attention, trained with the multi-task objectives (reimplemented from the paper)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from urbanprofile.data.city import SPARSE_VIEW_ABOVE, CityData
from urbanprofile.embedders.multiview.inputs import MULTI_VIEWS, SIMILARITY_VIEWS, MultiViewInputs
from urbanprofile.embedders.multiview.layers import (
    MemoryViewFusion,
    MultiViewFusion,
    ReconstructionHeads,
    RegionBlock,
    readout,
)
from urbanprofile.embedders.multiview.minibatch import RegionBatch
from urbanprofile.embedders.multiview.training import MultiTaskObjective, MultiViewEmbedder, multitask_step
from urbanprofile.errors import MethodUnavailableError

#: Inter-view fusions of :class:`HAFusionEmbedder`, by name.
VIEW_FUSIONS = ("attention", "memory")


class HAFusionNetwork(nn.Module):
    """View fusion -> inter-region self-attention blocks -> read-out."""

    def __init__(self, features: dict[str, torch.Tensor], d: int, n_intra_layers: int, n_layers: int,
                 n_heads: int, dropout: float, readout_kind: str = "deepfc", feedforward: int | None = None,
                 edge_channels: int | None = None, view_fusion: str = "attention", memory_blocks: int = 2,
                 memory_size: int = 72) -> None:
        super().__init__()
        self.features = features
        n_regions = next(iter(features.values())).shape[0]
        fusion = MemoryViewFusion(d, n_regions, memory_blocks, memory_size) if view_fusion == "memory" else None
        self.views = MultiViewFusion({v: x.shape[1] for v, x in features.items()}, d, n_intra_layers, n_heads,
                                     dropout, feedforward, edge_channels, fusion)
        self.blocks = nn.ModuleList(RegionBlock(d, n_heads, dropout, feedforward=feedforward) for _ in range(n_layers))
        self.out = readout(readout_kind, d, d)
        self.heads = ReconstructionHeads(d, tuple(v for v in SIMILARITY_VIEWS if v in features))

    def forward(self, batch: RegionBatch | None = None) -> torch.Tensor:
        """The (N, d) embedding, or with a mini-batch the (B, d) embedding of its regions (attention within it)."""
        features = self.features if batch is None else {v: x[batch.index] for v, x in self.features.items()}
        h = self.views(features)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


class HAFusionEmbedder(MultiViewEmbedder):
    """Attentive multi-view fusion with dense inter-region self-attention (no spatial prior).

    Args:
        d: Embedding width (the paper's 144).
        n_intra_layers: Intra-view region attention blocks per view.
        n_layers: Inter-region self-attention blocks after the view fusion.
        n_heads: Attention heads.
        dropout: Dropout.
        epochs: Full-batch epochs; the final epoch's embedding is the embedding, and evenly spaced
            checkpoints are candidates a protocol may choose among by inner CV on training folds.
        lr: Adam learning rate.
        weight_decay: Adam weight decay (the authors' 5e-4).
        objective: The multi-task objective: ``authors`` (the authors' code: volume-weighted mobility on
            ``od_target``, cosine similarities), ``distribution``, or a dict of settings
            (:data:`~urbanprofile.embedders.multiview.inputs.OBJECTIVES`).
        readout: ``deepfc`` (the authors' code: ends in LeakyReLU(0.3)) or ``mlp``.
        feedforward: Hidden width of a ReLU feed-forward with dropout in every attention block (the
            authors' code: 2048 in their intra-view and inter-region blocks; the default); ``None``: ``2 d``
            GELU. With 2048, 10 of 12 `paper`/`nested` cells are within 0.03 R² of the authors' code (7
            with ``None``), at a cost under `spatial` (README, fidelity section).
        edge_channels: Channels of the authors' attention-map edge path in the intra-view blocks (their
            32: each attention weight expanded to that many values by a 1x1 convolution, pooled per region
            by a softmax over its row, mapped back and added to the attention output); ``None``: none.
        view_fusion: ``attention`` (a Transformer layer over each region's view tokens, attentive pooling)
            or ``memory`` (the authors' external-memory blocks and convolutional view scores,
            :class:`~urbanprofile.embedders.multiview.layers.MemoryViewFusion`).
        memory_blocks: External-memory blocks of ``view_fusion="memory"`` (the authors': 2 Chicago, 3 NYC).
        memory_size: Memory slots per block (the authors' half of their token width: 36 / 72).
        views: Count views read: ``od_flows`` (the mobility objective) and any of ``poi_counts``,
            ``landuse_counts`` (the registry passes those a city has).
        mode: ``auto`` (mini-batches above ``minibatch_above`` regions, else full batch), ``full`` or
            ``minibatch`` (:mod:`~urbanprofile.embedders.multiview.minibatch`: spatially compact batches, dense
            attention among the batch's regions, the losses over the batch's regions and trips).
        batch_size: Regions per mini-batch.
        minibatch_above: Largest city trained full-batch under ``auto`` (the default: where square views become
            sparse, since the full-batch form holds dense N x N attention maps and views).
        negatives: Regions drawn uniformly from outside each mini-batch and added to it (context for its
            attention, candidates of its losses; their own outputs are not kept).
        random_state: Seed of the initialisation.
    """

    def __init__(self, d: int = 144, n_intra_layers: int = 1, n_layers: int = 2, n_heads: int = 4,
                 dropout: float = 0.1, epochs: int = 500, lr: float = 5e-4, weight_decay: float = 5e-4,
                 objective: str | dict[str, Any] = "authors", readout: str = "deepfc",
                 feedforward: int | None = 2048, edge_channels: int | None = None,
                 view_fusion: str = "attention", memory_blocks: int = 2, memory_size: int = 72,
                 views: tuple[str, ...] = MULTI_VIEWS, mode: str = "auto", batch_size: int = 1024,
                 minibatch_above: int = SPARSE_VIEW_ABOVE, negatives: int = 0,
                 random_state: int | None = 0) -> None:
        self.d = d
        self.n_intra_layers = n_intra_layers
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.dropout = dropout
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.objective = objective
        self.readout = readout
        self.feedforward = feedforward
        self.edge_channels = edge_channels
        self.view_fusion = view_fusion
        self.memory_blocks = memory_blocks
        self.memory_size = memory_size
        self.views = views
        self.mode = mode
        self.batch_size = batch_size
        self.minibatch_above = minibatch_above
        self.negatives = negatives
        self.random_state = random_state

    minibatch_unsupported = None

    def build(self, city: CityData, inputs: MultiViewInputs) -> tuple[Any, Callable[[], dict[str, Any]]]:
        if self.view_fusion not in VIEW_FUSIONS:
            raise ValueError(f"unknown view_fusion {self.view_fusion!r}; valid: {', '.join(VIEW_FUSIONS)}")
        features = {v: torch.as_tensor(x, dtype=torch.float32) for v, x in inputs.features.items()}
        network = HAFusionNetwork(features, self.d, self.n_intra_layers, self.n_layers, self.n_heads, self.dropout,
                                  self.readout, self.feedforward, self.edge_channels, self.view_fusion,
                                  self.memory_blocks, self.memory_size)
        objective = MultiTaskObjective(inputs, views=inputs.similarity_views, random_state=self.random_state,
                                       objective=self.objective)
        return network, multitask_step(network, network.heads, objective)

    def build_minibatch(self, city: CityData, inputs: MultiViewInputs) -> tuple[Any, np.ndarray | None]:
        if self.view_fusion not in VIEW_FUSIONS:
            raise ValueError(f"unknown view_fusion {self.view_fusion!r}; valid: {', '.join(VIEW_FUSIONS)}")
        if self.view_fusion == "memory":
            raise MethodUnavailableError(
                "HAFusionEmbedder: view_fusion='memory' has no mini-batch mode (its view scores project each "
                "coordinate's column over all N regions); use view_fusion='attention' or mode='full'")
        features = {v: torch.as_tensor(x, dtype=torch.float32) for v, x in inputs.features.items()}
        network = HAFusionNetwork(features, self.d, self.n_intra_layers, self.n_layers, self.n_heads, self.dropout,
                                  self.readout, self.feedforward, self.edge_channels, self.view_fusion)
        return network, None
