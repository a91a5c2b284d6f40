"""Torch layers shared by the multi-view embedders: region attention (dense or k-nearest), view fusion.

Regions are the tokens. Attention is either dense (every region attends to every region, O(N^2)) or
restricted to a neighbourhood index (each region attends to its k neighbours, O(N k)); both take an
optional additive bias per head, which is how spatial priors enter (Graphormer style).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RegionAttention(nn.Module):
    """Multi-head self-attention over regions.

    Args:
        d: Model width.
        n_heads: Heads (``d`` must be divisible by it).
        dropout: Dropout on the attention weights.
        edge_channels: Channels of an :class:`AttentionEdges` path whose output is added to the attention's
            (HAFusion's intra-view blocks: 32); ``None``: no edge path.
    """

    def __init__(self, d: int, n_heads: int, dropout: float = 0.0, edge_channels: int | None = None) -> None:
        super().__init__()
        if d % n_heads:
            raise ValueError(f"d={d} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d // n_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.dropout = nn.Dropout(dropout)
        self.edges = AttentionEdges(edge_channels, d) if edge_channels is not None else None

    def forward(
        self, h: torch.Tensor, neighbors: torch.Tensor | None = None, bias: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend.

        Args:
            h: (N, d) region features.
            neighbors: ``None`` for dense attention, else (N, k) indices each region attends to.
            bias: Additive logits per head: (H, N, N) dense, or (H, N, k) with ``neighbors``.
            mask: (N, k) booleans, with ``neighbors``: which neighbours are attended to (a mini-batch leaves
                out those outside it); every row must keep at least one.

        With ``neighbors`` of M < N rows only the first M regions attend (a halo batch's inner rows, whose
        neighbours lie among the N) and the output has M rows.
        """
        n = h.shape[0]
        q, k, v = self.qkv(h).view(n, 3, self.n_heads, self.head_dim).unbind(1)  # (N, H, dh) each
        n_out = n if neighbors is None else neighbors.shape[0]
        q = q[:n_out]
        scale = 1.0 / math.sqrt(self.head_dim)
        if neighbors is None:
            logits = torch.einsum("nhd,mhd->hnm", q, k) * scale
            if bias is not None:
                logits = logits + bias
            weights = self.dropout(torch.softmax(logits, dim=-1))
            mixed = torch.einsum("hnm,mhd->nhd", weights, v)
        else:
            logits = torch.einsum("nhd,nkhd->hnk", q, k[neighbors]) * scale
            if bias is not None:
                logits = logits + bias
            if mask is not None:
                logits = logits.masked_fill(~mask[None], float("-inf"))
            weights = self.dropout(torch.softmax(logits, dim=-1))
            mixed = torch.einsum("hnk,nkhd->nhd", weights, v[neighbors])
        out = self.out(mixed.reshape(n_out, -1))
        if self.edges is not None:
            out = out + self.edges(weights.mean(dim=0))
        return out


class AttentionEdges(nn.Module):
    """HAFusion's attention-map edge path: each attention weight as a small edge vector, pooled per region.

    Every entry a_ij of the head-averaged attention map becomes ``channels`` values e_ij = w * a_ij + b (a
    1x1 convolution of the map); each region pools its row by a softmax over j of those same values,
    sum_j softmax_j(e_ij) * e_ij per channel, and a linear map takes the pooled channels to width ``d``.

    Args:
        channels: Edge channels (the authors' 32).
        d: Output width.
    """

    def __init__(self, channels: int, d: int) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"edge_channels must be >= 1 or None, got {channels}")
        self.expand = nn.Linear(1, channels)
        self.project = nn.Linear(channels, d)

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        """(N, M) attention weights (dense, or over M neighbours) -> (N, d)."""
        edges = self.expand(weights.unsqueeze(-1))  # (N, M, c)
        pooled = (torch.softmax(edges, dim=1) * edges).sum(dim=1)  # (N, c)
        return self.project(pooled)


def feed_forward(d: int, ffn_mult: int = 2, feedforward: int | None = None, dropout: float = 0.0) -> nn.Sequential:
    """A block's position-wise feed-forward network.

    Args:
        d: Model width.
        ffn_mult: Hidden width ``ffn_mult * d`` with GELU, when ``feedforward`` is ``None``.
        feedforward: Hidden width of a ReLU feed-forward with dropout on the hidden layer (HAFusion's code:
            2048, PyTorch's Transformer default); ``None`` for the GELU one.
        dropout: Dropout on the hidden layer of the ReLU form.
    """
    if feedforward is None:
        return nn.Sequential(nn.Linear(d, ffn_mult * d), nn.GELU(), nn.Linear(ffn_mult * d, d))
    if feedforward < 1:
        raise ValueError(f"feedforward must be >= 1 or None, got {feedforward}")
    return nn.Sequential(nn.Linear(d, feedforward), nn.ReLU(), nn.Dropout(dropout), nn.Linear(feedforward, d))


class RegionBlock(nn.Module):
    """Region attention then a position-wise feed-forward network, each with residual and LayerNorm.

    Args:
        d: Model width.
        n_heads: Attention heads.
        dropout: Dropout.
        ffn_mult: Hidden width of the GELU feed-forward, as a multiple of ``d``.
        feedforward: Hidden width of a ReLU feed-forward instead (:func:`feed_forward`).
        edge_channels: Channels of the attention's edge path (:class:`AttentionEdges`); ``None``: none.
    """

    def __init__(self, d: int, n_heads: int, dropout: float = 0.1, ffn_mult: int = 2,
                 feedforward: int | None = None, edge_channels: int | None = None) -> None:
        super().__init__()
        self.attention = RegionAttention(d, n_heads, dropout, edge_channels)
        self.ffn = feed_forward(d, ffn_mult, feedforward, dropout)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, h: torch.Tensor, neighbors: torch.Tensor | None = None, bias: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attended = self.attention(h, neighbors, bias, mask)  # fewer rows than h when neighbors has fewer
        h = self.norm1(h[: attended.shape[0]] + self.dropout(attended))
        return self.norm2(h + self.dropout(self.ffn(h)))


class ViewEncoder(nn.Module):
    """One view's features -> region embeddings, refined by intra-view region attention.

    Args:
        in_dim: Feature width of the view.
        d: Embedding width.
        n_layers: Intra-view attention blocks (0 for a plain MLP).
        n_heads: Attention heads.
        dropout: Dropout.
        feedforward: Hidden width of the blocks' ReLU feed-forward (``None``: ``2 d`` GELU).
        edge_channels: Channels of the blocks' attention-map edge path (``None``: none).
    """

    def __init__(self, in_dim: int, d: int, n_layers: int = 1, n_heads: int = 4, dropout: float = 0.1,
                 feedforward: int | None = None, edge_channels: int | None = None) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(in_dim, d), nn.GELU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(RegionBlock(d, n_heads, dropout, feedforward=feedforward,
                                                edge_channels=edge_channels) for _ in range(n_layers))

    def forward(self, x: torch.Tensor, neighbors: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, rows: list[int] | None = None) -> torch.Tensor:
        """Embed; with ``rows`` (one count per block, with ``neighbors``) block i outputs only its first rows[i]
        regions (a halo batch shrinking towards its targets, each ring computed only as far as it is needed)."""
        h = self.project(x)
        for i, block in enumerate(self.blocks):
            if rows is None or neighbors is None:
                h = block(h, neighbors, mask=mask)
            else:
                h = block(h, neighbors[: rows[i]], mask=None if mask is None else mask[: rows[i]])
        return h


class ViewFusion(nn.Module):
    """Inter-view fusion: view tokens of each region attend to each other, then attentive pooling.

    The pooling weights are one softmax over views from the mean over regions of q . tanh(W z + b)
    (MVURE/HAFusion's attentive fusion), so they say how much each view counts; the last ones are kept
    in ``view_weights``.

    Args:
        d: Embedding width.
        n_heads: Heads of the inter-view attention.
        mix_views: Run inter-view attention before pooling (off: pooling only).
        dropout: Dropout.
    """

    def __init__(self, d: int, n_heads: int = 4, mix_views: bool = True, dropout: float = 0.1) -> None:
        super().__init__()
        self.mix = (
            nn.TransformerEncoderLayer(d, n_heads, 2 * d, dropout, batch_first=True) if mix_views else None
        )
        self.score = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 1, bias=False))
        self.view_weights = torch.zeros(0)
        self.row_scores = torch.zeros(0)

    def forward(self, views: list[torch.Tensor], row_weights: torch.Tensor | None = None,
                pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Fuse (N, d) views into (N, d).

        Args:
            views: One (N, d) tensor per view.
            row_weights: (N,) weights of the rows in the pooled score, summing to 1 (``None``: the mean over
                rows). A mini-batch with a halo weighs its target regions as a sample of the city and its halo 0.
            pooled: (V,) pooled scores to use instead of the rows' (a batch embedded with the city's scores).
        """
        z = torch.stack(views, dim=1)  # (N, V, d)
        if self.mix is not None:
            z = self.mix(z)
        scores = self.score(z).squeeze(-1)  # (N, V)
        self.row_scores = scores.detach()
        if pooled is None:
            pooled = scores.mean(dim=0) if row_weights is None else (row_weights[:, None] * scores).sum(dim=0)
        weights = torch.softmax(pooled, dim=0)  # (V,)
        self.view_weights = weights.detach()
        return (z * weights[None, :, None]).sum(dim=1)


class MemoryViewFusion(nn.Module):
    """HAFusion's inter-view fusion: external-memory blocks, a learnable mix, convolutional view scores.

    Each region's view tokens pass through ``n_blocks`` external-memory blocks in turn: a bias-free
    linear map to ``memory`` slots, a softmax over the views, a normalisation to sum 1 over the slots,
    a bias-free linear map back (weights start near zero, std 1e-3, as the authors'). A DeepFc follows,
    and its output is mixed with the views as they came in by two learnable weights (starting at 0.9
    for the memory path and 0.1 for the input, each divided by their sum). The views are then weighted
    by one softmax over scores computed per embedding coordinate from that coordinate's column over the
    regions (a bias-free projection to ``score_width``, two linear scores, LeakyReLU(0.3) of their pairwise
    sums, averaged over views and coordinates) and summed. The last weights are kept in ``view_weights``.

    Args:
        d: Embedding width.
        n_regions: Regions (the view scores project each coordinate's column over them).
        n_blocks: External-memory blocks (the authors': 2 Chicago, 3 NYC).
        memory: Memory slots per block.
        score_width: Width of the view-score projection (the authors': 32 Chicago, 64 NYC).
    """

    def __init__(self, d: int, n_regions: int, n_blocks: int = 2, memory: int = 72, score_width: int = 64) -> None:
        super().__init__()
        if n_blocks < 1 or memory < 1 or score_width < 1:
            raise ValueError(f"memory fusion needs n_blocks, memory and score_width >= 1, got {n_blocks}, "
                             f"{memory}, {score_width}")
        self.keys = nn.ModuleList(nn.Linear(d, memory, bias=False) for _ in range(n_blocks))
        self.values = nn.ModuleList(nn.Linear(memory, d, bias=False) for _ in range(n_blocks))
        for layer in [*self.keys, *self.values]:
            nn.init.normal_(layer.weight, std=1e-3)
        self.fc = deep_fc(d, d)
        self.mix = nn.Parameter(torch.tensor([0.9, 0.1]))  # memory path, input views
        self.columns = nn.Linear(n_regions, score_width, bias=False)
        self.score_self = nn.Linear(score_width, 1)
        self.score_other = nn.Linear(score_width, 1)
        self.view_weights = torch.zeros(0)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        z = torch.stack(views, dim=1)  # (N, V, d)
        m = z
        for key, value in zip(self.keys, self.values, strict=True):
            slots = torch.softmax(key(m), dim=1)  # over the views
            m = value(slots / slots.sum(dim=2, keepdim=True))
        share = self.mix / self.mix.sum()
        mixed = share[0] * self.fc(m) + share[1] * z  # (N, V, d)
        columns = self.columns(mixed.permute(2, 1, 0))  # (d, V, score_width): a coordinate's column per view
        own, other = self.score_self(columns), self.score_other(columns).transpose(1, 2)  # (d, V, 1), (d, 1, V)
        scores = nn.functional.leaky_relu(own + other, 0.3).mean(dim=2).mean(dim=0)  # (V,)
        weights = torch.softmax(scores, dim=0)
        self.view_weights = weights.detach()
        return (mixed * weights[None, :, None]).sum(dim=1)


class SpatialBias(nn.Module):
    """Graphormer-style spatial bias per head: lambda * (a_h * A_ij + b_h[bucket_ij]).

    ``A`` is the distance-based adjacency and ``bucket`` a hop or distance bucket; ``a_h`` starts at 1 and
    ``b_h`` at 0, so training starts from the paper's bias "derived from A" and may reshape it.

    Args:
        n_heads: Heads.
        n_buckets: Number of hop/distance buckets.
        weight: lambda, the weight of the spatial bias.
    """

    def __init__(self, n_heads: int, n_buckets: int, weight: float) -> None:
        super().__init__()
        self.weight = weight
        self.scale = nn.Parameter(torch.ones(n_heads))
        self.bucket = nn.Embedding(n_buckets, n_heads)
        nn.init.zeros_(self.bucket.weight)

    def forward(self, adjacency: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
        """(N, N) or (N, k) adjacency and buckets -> (H, N, N) or (H, N, k) bias."""
        per_head = self.scale[:, None, None] * adjacency[None] + self.bucket(buckets).permute(2, 0, 1)
        return self.weight * per_head


def mlp(d_in: int, d_out: int, hidden: int | None = None) -> nn.Sequential:
    """A two-layer MLP, the light output refinement of the region embedders."""
    hidden = hidden or d_out
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


def deep_fc(d_in: int, d_out: int, slope: float = 0.3) -> nn.Sequential:
    """HAFusion's read-out: two linear maps to twice the width, LeakyReLU, a linear map, LeakyReLU.

    The final LeakyReLU (slope 0.3) shrinks negative coordinates, which keeps the embedding low-rank.
    """
    return nn.Sequential(nn.Linear(d_in, 2 * d_in), nn.Linear(2 * d_in, 2 * d_in), nn.LeakyReLU(slope),
                         nn.Linear(2 * d_in, d_out), nn.LeakyReLU(slope))


#: Read-outs of the region embedders, by name.
READOUTS = ("deepfc", "mlp")


def readout(kind: str, d_in: int, d_out: int) -> nn.Sequential:
    """The output refinement: ``deepfc`` (HAFusion's code) or ``mlp`` (Linear-GELU-Linear)."""
    if kind == "deepfc":
        return deep_fc(d_in, d_out)
    if kind == "mlp":
        return mlp(d_in, d_out)
    raise ValueError(f"unknown readout {kind!r}; valid: {', '.join(READOUTS)}")


class ReconstructionHeads(nn.Module):
    """Linear heads from the region embedding to the spaces each objective compares in.

    ``source``/``destination`` give e_s and e_d of the mobility objective; one head per similarity view
    gives the vectors whose dot products reconstruct that view's similarity.
    """

    def __init__(self, d: int, similarity_views: tuple[str, ...] = ("poi", "landuse")) -> None:
        super().__init__()
        self.source = nn.Linear(d, d)
        self.destination = nn.Linear(d, d)
        self.similarity = nn.ModuleDict({view: nn.Linear(d, d) for view in similarity_views})


class MultiViewFusion(nn.Module):
    """View-specific embeddings with intra-view region attention, fused across views into H~ (N, d).

    The multi-view learning stage that HAFusion introduced and ToPT's SREL reuses.

    Args:
        in_dims: Feature width of each view, by name.
        d: Embedding width.
        n_intra_layers: Intra-view attention blocks per view.
        n_heads: Attention heads.
        dropout: Dropout.
        feedforward: Hidden width of the intra-view blocks' ReLU feed-forward (``None``: ``2 d`` GELU).
        edge_channels: Channels of the intra-view blocks' attention-map edge path (``None``: none).
        fusion: The inter-view fusion module (list of (N, d) views -> (N, d)); ``None``: :class:`ViewFusion`.
    """

    def __init__(self, in_dims: dict[str, int], d: int, n_intra_layers: int = 1, n_heads: int = 4,
                 dropout: float = 0.1, feedforward: int | None = None, edge_channels: int | None = None,
                 fusion: nn.Module | None = None) -> None:
        super().__init__()
        self.view_names = list(in_dims)
        self.encoders = nn.ModuleDict(
            {v: ViewEncoder(dim, d, n_intra_layers, n_heads, dropout, feedforward, edge_channels)
             for v, dim in in_dims.items()}
        )
        self.fusion = fusion if fusion is not None else ViewFusion(d, n_heads, mix_views=True, dropout=dropout)

    def forward(self, features: dict[str, torch.Tensor], neighbors: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, rows: list[int] | None = None,
                **pooling: torch.Tensor | None) -> torch.Tensor:
        """Encode and fuse the views; ``rows`` goes to each :class:`ViewEncoder`, ``pooling`` (``row_weights``,
        ``pooled``: for the rows left) to a :class:`ViewFusion`."""
        encoded = [self.encoders[v](features[v], neighbors, mask, rows) for v in self.view_names]
        left = encoded[0].shape[0]
        given = {k: (v[:left] if k == "row_weights" else v) for k, v in pooling.items() if v is not None}
        return self.fusion(encoded, **given) if given else self.fusion(encoded)
