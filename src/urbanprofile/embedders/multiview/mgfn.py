"""MGFN-style embedder (Wu et al., IJCAI 2022): mobility pattern graphs (OD by time pattern) fused by
intra-pattern and inter-pattern attention, trained with the mobility distribution loss
(reimplemented from the paper)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from urbanprofile.data.city import SPARSE_VIEW_ABOVE, CityData, is_sparse_view
from urbanprofile.data.features import LogScaler
from urbanprofile.embedders.multiview.inputs import MultiViewInputs
from urbanprofile.embedders.multiview.layers import ReconstructionHeads, RegionBlock, mlp
from urbanprofile.embedders.multiview.training import MultiTaskObjective, MultiViewEmbedder, multitask_step
from urbanprofile.errors import MethodUnavailableError


class MGFNNetwork(nn.Module):
    """Per pattern: flow profiles -> region attention (intra-pattern); per region: attention across its
    pattern embeddings (inter-pattern), mean-pooled, then an MLP."""

    def __init__(self, patterns: torch.Tensor, d: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.patterns = patterns  # (P, N, F)
        n_patterns, _, width = patterns.shape
        self.project = mlp(width, d)
        self.pattern_embedding = nn.Parameter(torch.zeros(n_patterns, 1, d))
        self.intra = RegionBlock(d, n_heads, dropout)
        self.inter = nn.TransformerEncoderLayer(d, n_heads, 2 * d, dropout, batch_first=True)
        self.out = mlp(d, d)
        self.heads = ReconstructionHeads(d, ())

    def forward(self) -> torch.Tensor:
        h = self.project(self.patterns) + self.pattern_embedding  # (P, N, d)
        h = torch.stack([self.intra(h[p]) for p in range(h.shape[0])], dim=1)  # (N, P, d)
        return self.out(self.inter(h).mean(dim=1))


class MGFNEmbedder(MultiViewEmbedder):
    """MGFN: multi-graph fusion of mobility patterns (needs the ``od_patterns`` view).

    Args:
        d: Embedding width.
        n_heads: Attention heads.
        dropout: Dropout.
        epochs: Full-batch epochs (the final one is the embedding; checkpoints are candidates).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        mode: ``full`` (or ``auto``, the same); ``minibatch`` is refused with the reason in
            :attr:`minibatch_unsupported`.
        random_state: Seed.
    """

    minibatch_unsupported = ("its inputs are dense P x N x N time-pattern graphs, each attended over all N "
                             "regions, so a batch's halo would be the whole city; not ported to mini-batches")

    #: MGFN keeps the per-row distribution objective it was benchmarked with (not re-checked against its code).
    objective = "distribution"

    def __init__(self, d: int = 144, n_heads: int = 4, dropout: float = 0.1, epochs: int = 500, lr: float = 5e-4,
                 weight_decay: float = 1e-5, mode: str = "full", random_state: int | None = 0) -> None:
        self.d = d
        self.n_heads = n_heads
        self.dropout = dropout
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.mode = mode
        self.random_state = random_state

    def fit(self, city: CityData) -> MGFNEmbedder:
        """Train on the city's mobility views (never its targets).

        Raises:
            MethodUnavailableError: The city is large enough that its time patterns stay on disk (MGFN's
                graphs are dense P x N x N), or it has no ``od_flows``/``od_patterns`` view.
        """
        self.uses_minibatch(city)  # refuses mode="minibatch" before the sparse check below
        if "od_patterns" not in city.views and "od_flows" in city.views and is_sparse_view(city.views["od_flows"]):
            raise MethodUnavailableError(
                f"mgfn needs dense (P, N, N) time-pattern graphs; dataset {city.name!r} has {city.n_regions} regions "
                f"(square views stay sparse above {SPARSE_VIEW_ABOVE}), so its od_patterns are kept on disk only")
        super().fit(city)
        return self

    def inputs(self, city: CityData) -> MultiViewInputs:
        return MultiViewInputs(features={}, od=city.view("od_flows").to_numpy(dtype=float))

    def build(self, city: CityData, inputs: MultiViewInputs) -> tuple[Any, Callable[[], dict[str, Any]]]:
        tensor = city.od_patterns().astype(float)  # (P, N, N)
        profiles = np.concatenate([tensor, tensor.transpose(0, 2, 1)], axis=2)  # out- and in-flows per pattern
        flat = profiles.reshape(-1, profiles.shape[2])
        scaled = LogScaler().fit(flat).transform(flat).reshape(profiles.shape)
        network = MGFNNetwork(torch.as_tensor(scaled, dtype=torch.float32), self.d, self.n_heads, self.dropout)
        objective = MultiTaskObjective(inputs, views=(), random_state=self.random_state, objective=self.objective)
        return network, multitask_step(network, network.heads, objective, mobility_only=True)
