"""UrbanVLP (AAAI 2025): multi-granularity vision-language pretraining over frozen modality encoders.

The paper fuses, per region, a macro branch (the satellite tile) with a micro branch (the street-view
scenes inside the tile and their locations, equation 4), aligns the fused region representation with
the tile's text by a CLIP-style contrastive loss (equation 5), and aligns each street-view scene with
its own caption token by token (max-similarity, equations 6-8); the total is
``alpha * L_CG + beta * L_CL`` (equation 9). Downstream, the pretrained encoders are frozen and a
light head is fit on their outputs.

Here the backbones are the frozen encoders of ``urbanprofile.encoders`` (MiniLM text, EfficientNet-Lite0
images, GeoCLIP or sinusoidal locations); what trains are the projection towers above them, the
aggregation and the fusion, on the CPU. Every input is an array of frozen-encoder outputs
(:class:`VLPInputs`), so the model is inductive: pretrain on one city, embed another.

What the data here has, and how each part of the paper maps onto it:

- **Macro branch**: the tile image where it exists (16 real tiles in all), otherwise a learned
  "no image" token, plus the tile's caption as the contrastive target of equation (5).
- **Micro branch**: every street-view item linked to the tile. An item's content is its photo where
  the photo exists (3 here) and otherwise its caption's sentence vector; its location goes through
  the location encoder. The tile centre is always one more location of the tile, so tiles without
  street view (all of Guangzhou) still have a location branch. Aggregation is the masked mean.
- **Token loss** (equations 6-8): the item side is a set of tokens, the item's location token (and
  its photo token where the photo exists); the text side is the caption's MiniLM token vectors
  (at most ``max_tokens``, evenly spaced). SIM(v, t) is the mean over item tokens of the maximum
  similarity to any caption token, SIM(t, v) the converse, contrasted over the items of a batch.
  Where every item is a caption, this teaches the location tower what is *seen* at a place.

Downstream (``transform``) the towers are frozen and the embedding is the concatenation of the
parts named by ``embedding`` (``fused``: the fused region vector of equation 4; ``macro``, ``micro``,
``location``: the three branch vectors e_st, e_sv, e_p the paper's probe reads; ``text``: the tile
caption through the aligned text tower).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from urbanprofile.data.city import CityData
from urbanprofile.embedders.base import Embedder, as_embedding
from urbanprofile.embedders.multimodal.urbanvlp_inputs import VLPInputs, vlp_inputs_from_city
from urbanprofile.errors import DataError, TrainingError

#: Parts the downstream embedding may be made of.
EMBEDDING_PARTS = ("fused", "macro", "micro", "location", "text")


def projection_tower(d_in: int, d: int) -> nn.Sequential:
    """A projection tower over a frozen encoder: LayerNorm, two-layer MLP."""
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, 2 * d), nn.GELU(), nn.Linear(2 * d, d))


class UrbanVLPNetwork(nn.Module):
    """Trainable towers, the aggregation and the fusion of equation (4), and the two temperatures.

    Args:
        text_dim: Width of the frozen text features (MiniLM: 384).
        location_dim: Width of the frozen location features.
        image_dim: Width of the frozen image features (EfficientNet-Lite0: 1280), 0 when no images.
        d: Width of every tower output and of the fused representation.
    """

    def __init__(self, text_dim: int, location_dim: int, image_dim: int, d: int) -> None:
        super().__init__()
        self.d = d
        self.text = projection_tower(text_dim, d)
        self.location = projection_tower(location_dim, d)
        self.image = projection_tower(image_dim, d) if image_dim else None
        self.no_image = nn.Parameter(torch.zeros(d))
        self.no_street_view = nn.Parameter(torch.zeros(d))
        self.fusion = nn.Sequential(nn.Linear(3 * d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        # CLIP's initial temperature 0.07, learned on the log scale (clamped in use).
        self.log_scale_global = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        self.log_scale_token = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def encode_text(self, x: torch.Tensor) -> torch.Tensor:
        return self.text(F.normalize(x, dim=-1))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        if self.image is None:
            raise DataError("UrbanVLP: image features were given but the network has no image tower")
        return self.image(x)

    def branches(self, batch: _Batch) -> dict[str, torch.Tensor]:
        """The macro, micro and location branch vectors of a batch of regions, and their fusion."""
        b = batch.n_regions
        macro = self.no_image.expand(b, -1)
        if batch.tile_image is not None and batch.has_tile_image is not None:
            macro = _fill_rows(macro, batch.has_tile_image, batch.tile_image, self.encode_image)
        d = self.d
        location_sum = self.location(batch.tile_location)
        location_count = torch.ones(b, 1)
        micro = self.no_street_view.expand(b, -1)
        if batch.item_region.numel():
            content = torch.zeros(batch.item_region.numel(), d)
            if batch.item_text is not None and batch.has_item_text is not None:
                content = _fill_rows(content, batch.has_item_text, batch.item_text, self.encode_text)
            if batch.item_image is not None and batch.has_item_image is not None:
                content = _fill_rows(content, batch.has_item_image, batch.item_image, self.encode_image)
            count = torch.zeros(b, 1).index_add_(0, batch.item_region, torch.ones(len(batch.item_region), 1))
            summed = torch.zeros(b, d).index_add_(0, batch.item_region, content)
            micro = torch.where(count > 0, summed / count.clamp(min=1), micro)
            item_location = self.location(batch.item_location)
            location_sum = location_sum.index_add(0, batch.item_region, item_location)
            location_count = location_count + count
        location = location_sum / location_count
        fused = self.fusion(torch.cat([macro, micro, location], dim=1))
        return {"fused": fused, "macro": macro, "micro": micro, "location": location}

    def item_tokens(self, batch: _Batch, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens of the item side of equations (6)-(8): the location token and, with a photo, the photo token."""
        tokens = [self.location(batch.item_location[items])]
        masks = [torch.ones(len(items), dtype=torch.bool)]
        if batch.item_image is not None and batch.has_item_image is not None and self.image is not None:
            has_photo = batch.has_item_image[items]
            if bool(has_photo.any()):
                photo = _fill_rows(torch.zeros_like(tokens[0]), has_photo, batch.item_image[items], self.encode_image)
                tokens.append(photo)
                masks.append(has_photo)
        return torch.stack(tokens, dim=1), torch.stack(masks, dim=1)


def _fill_rows(base: torch.Tensor, mask: torch.Tensor, features: torch.Tensor,
               encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``base`` with the rows under ``mask`` replaced by ``encode(features[mask])`` (only those are encoded)."""
    rows = torch.nonzero(mask, as_tuple=True)[0]
    if not len(rows):
        return base
    return base.index_put((rows,), encode(features[rows]))


@dataclass
class _Batch:
    """Tensors of a set of regions and of the street-view items inside them (item_region re-indexed)."""

    n_regions: int
    tile_text: torch.Tensor
    tile_location: torch.Tensor
    tile_image: torch.Tensor | None
    has_tile_image: torch.Tensor | None
    item_region: torch.Tensor
    item_location: torch.Tensor
    item_text: torch.Tensor | None
    has_item_text: torch.Tensor | None
    item_image: torch.Tensor | None
    has_item_image: torch.Tensor | None
    item_index: np.ndarray


class _Index:
    """Items grouped by region (CSR order) for fast per-batch gathers."""

    def __init__(self, item_region: np.ndarray, n_regions: int) -> None:
        self.order = np.argsort(item_region, kind="stable")
        counts = np.bincount(item_region, minlength=n_regions)
        self.start = np.concatenate([[0], np.cumsum(counts)])

    def items(self, regions: np.ndarray, max_items: int | None, rng: np.random.Generator | None) -> np.ndarray:
        chunks = []
        for r in regions:
            chunk = self.order[self.start[r]:self.start[r + 1]]
            if max_items is not None and len(chunk) > max_items:
                chunk = rng.choice(chunk, max_items, replace=False) if rng is not None else chunk[:max_items]
            chunks.append(chunk)
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)


def _tensor(array: np.ndarray | None, rows: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    if array is None:
        return None
    return torch.as_tensor(np.asarray(array[rows]), dtype=dtype)


def make_batch(inputs: VLPInputs, index: _Index, regions: np.ndarray, max_items: int | None = None,
               rng: np.random.Generator | None = None) -> _Batch:
    """Gather the tensors of ``regions`` and their items."""
    items = index.items(regions, max_items, rng) if inputs.n_items else np.zeros(0, dtype=np.int64)
    position = np.full(inputs.n_regions, -1, dtype=np.int64)
    position[regions] = np.arange(len(regions))
    has_tile_image = _tensor(inputs.has_tile_image, regions, torch.bool)
    empty_d = inputs.location_dim
    return _Batch(
        n_regions=len(regions),
        tile_text=torch.as_tensor(inputs.tile_text[regions], dtype=torch.float32),
        tile_location=torch.as_tensor(inputs.tile_location[regions], dtype=torch.float32),
        tile_image=_tensor(inputs.tile_image, regions),
        has_tile_image=has_tile_image,
        item_region=torch.as_tensor(position[inputs.item_region[items]] if len(items) else np.zeros(0, np.int64)),
        item_location=(torch.as_tensor(inputs.item_location[items], dtype=torch.float32)
                       if inputs.item_location is not None else torch.zeros(0, empty_d)),
        item_text=_tensor(inputs.item_text, items),
        has_item_text=_tensor(inputs.has_item_text, items, torch.bool),
        item_image=_tensor(inputs.item_image, items),
        has_item_image=_tensor(inputs.has_item_image, items, torch.bool),
        item_index=items,
    )


def clip_loss(a: torch.Tensor, b: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Equation (5): symmetric InfoNCE between matched rows of ``a`` and ``b`` (normalised inside)."""
    logits = log_scale.clamp(max=np.log(100.0)).exp() * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    target = torch.arange(len(a))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def token_similarity(
    v: torch.Tensor, v_mask: torch.Tensor, t: torch.Tensor, t_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Equations (6) and (7) for every (item i, caption j) pair of a batch.

    Args:
        v: (B, L1, d) item tokens; ``v_mask`` (B, L1) marks real ones.
        t: (B, L2, d) caption tokens; ``t_mask`` (B, L2) marks real ones.

    Returns:
        ``(sim_vt, sim_tv)``, each (B, B): ``sim_vt[i, j]`` = mean over the tokens of item i of their
        maximum cosine similarity to a token of caption j; ``sim_tv[i, j]`` = mean over the tokens of
        caption i of their maximum similarity to a token of item j.
    """
    v = F.normalize(v, dim=-1)
    t = F.normalize(t, dim=-1)
    sim = torch.einsum("ikd,jld->ijkl", v, t)  # (Bv, Bt, L1, L2)
    very_negative = torch.finfo(sim.dtype).min / 4
    pair_mask = v_mask[:, None, :, None] & t_mask[None, :, None, :]
    sim = sim.masked_fill(~pair_mask, very_negative)
    v_count = v_mask.sum(dim=1).clamp(min=1).to(sim.dtype)
    t_count = t_mask.sum(dim=1).clamp(min=1).to(sim.dtype)
    best_for_v = sim.max(dim=3).values.masked_fill(~v_mask[:, None, :], 0.0)  # (Bv, Bt, L1)
    sim_vt = best_for_v.sum(dim=2) / v_count[:, None]
    best_for_t = sim.max(dim=2).values.masked_fill(~t_mask[None, :, :], 0.0)  # (Bv, Bt, L2)
    sim_tv = (best_for_t.sum(dim=2) / t_count[None, :]).T  # row = caption i, column = item j
    return sim_vt, sim_tv


def token_loss(v: torch.Tensor, v_mask: torch.Tensor, t: torch.Tensor, t_mask: torch.Tensor,
               log_scale: torch.Tensor) -> torch.Tensor:
    """Equation (8): InfoNCE over the token-level similarities, both directions."""
    sim_vt, sim_tv = token_similarity(v, v_mask, t, t_mask)
    scale = log_scale.clamp(max=np.log(100.0)).exp()
    target = torch.arange(len(v))
    return 0.5 * (F.cross_entropy(scale * sim_vt, target) + F.cross_entropy(scale * sim_tv, target))


class UrbanVLPEmbedder(Embedder):
    """UrbanVLP over frozen encoders: train the towers without labels, then embed any city.

    Args:
        d: Width of the towers and of each embedding part.
        epochs: Passes over the tiles that have a caption.
        batch_size: Tiles per batch (the negatives of equation 5).
        token_batch: Street-view items per batch in the token loss (the negatives of equation 8).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        alpha: Weight of the global loss L_CG.
        beta: Weight of the token loss L_CL.
        max_items: At most this many street-view items per tile in a training batch (all at inference).
        embedding: ``+``-separated parts of the downstream embedding, from :data:`EMBEDDING_PARTS`.
        location_encoder: ``geoclip`` or ``sinusoidal`` (used when building inputs from a city).
        images: Whether tile and street-view photos are used where they exist.
        max_tokens: At most this many caption tokens per street-view item (evenly spaced).
        random_state: Seed of the initialisation and the batches.
    """

    #: Called with (epoch, epochs) after each training epoch (the CLI sets it to drive a progress bar).
    on_epoch: Callable[[int, int], None] | None = None

    def __init__(
        self,
        d: int = 32,
        epochs: int = 20,
        batch_size: int = 256,
        token_batch: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        alpha: float = 1.0,
        beta: float = 1.0,
        max_items: int = 16,
        embedding: str = "fused+macro+micro+location+text",
        location_encoder: str = "geoclip",
        images: bool = True,
        max_tokens: int = 32,
        random_state: int | None = None,
    ) -> None:
        self.d = d
        self.epochs = epochs
        self.batch_size = batch_size
        self.token_batch = token_batch
        self.lr = lr
        self.weight_decay = weight_decay
        self.alpha = alpha
        self.beta = beta
        self.max_items = max_items
        self.embedding = embedding
        self.location_encoder = location_encoder
        self.images = images
        self.max_tokens = max_tokens
        self.random_state = random_state

    # -- configuration ---------------------------------------------------------------------------
    def _check_params(self) -> list[str]:
        parts = [p for p in self.embedding.split("+") if p]
        unknown = [p for p in parts if p not in EMBEDDING_PARTS]
        if not parts or unknown:
            raise ValueError(f"embedding must be '+'-separated parts of {EMBEDDING_PARTS}, got {self.embedding!r}")
        if self.d < 1 or self.epochs < 1 or self.batch_size < 2 or self.token_batch < 2 or self.lr <= 0:
            raise ValueError("d and epochs must be >= 1, batch_size and token_batch >= 2, lr > 0")
        if self.alpha < 0 or self.beta < 0 or self.alpha + self.beta == 0:
            raise ValueError(f"alpha and beta must be >= 0 and not both 0, got {self.alpha}, {self.beta}")
        if self.max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {self.max_items}")
        return parts

    @classmethod
    def unavailable_reason(cls, name: str, city: CityData, **params: object) -> str | None:
        """Why the method cannot run on ``city`` (no tile captions), or ``None``; the registry asks before fitting."""
        if "tile_caption" not in city.modalities:
            return f"{name} needs tile captions, which {city.name} lacks"
        return None

    def inputs(self, city: CityData) -> VLPInputs:
        """Frozen-encoder inputs of a city (the CityView views through the modality encoders)."""

        return vlp_inputs_from_city(city, location_encoder=self.location_encoder, images=self.images,
                                    max_tokens=self.max_tokens)

    # -- training --------------------------------------------------------------------------------
    def fit(self, city: CityData) -> UrbanVLPEmbedder:
        """Pretrain on the city's captions, street view, images and locations (never its targets)."""
        self._check_params()
        return self.fit_inputs(self.inputs(city))

    def fit_inputs(self, inputs: VLPInputs) -> UrbanVLPEmbedder:
        """Pretrain on precomputed frozen-encoder inputs (one city, or several pooled)."""
        self._check_params()
        inputs.validate()
        seed = 0 if self.random_state is None else int(self.random_state)
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        network = UrbanVLPNetwork(inputs.text_dim, inputs.location_dim, inputs.image_dim, self.d)
        optimizer = torch.optim.AdamW(network.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        index = _Index(inputs.item_region, inputs.n_regions)
        captioned = np.flatnonzero(inputs.has_tile_text)
        token_items = self._token_items(inputs)
        tokens = inputs.item_tokens
        mask = inputs.item_token_mask
        self.losses_: list[dict[str, float]] = []
        network.train()
        for epoch in range(1, self.epochs + 1):
            order = rng.permutation(captioned)
            totals = {"global": 0.0, "token": 0.0}
            n_batches = 0
            for start in range(0, len(order), self.batch_size):
                regions = order[start:start + self.batch_size]
                if len(regions) < 2:
                    continue
                batch = make_batch(inputs, index, regions, self.max_items, rng)
                parts: dict[str, torch.Tensor] = {}
                if self.alpha > 0:
                    fused = network.branches(batch)["fused"]
                    text = network.encode_text(batch.tile_text)
                    parts["global"] = self.alpha * clip_loss(fused, text, network.log_scale_global)
                if self.beta > 0 and tokens is not None and mask is not None:
                    chosen = np.intersect1d(batch.item_index, token_items)
                    if len(chosen) >= 2:
                        if len(chosen) > self.token_batch:
                            chosen = rng.choice(chosen, self.token_batch, replace=False)
                        positions = torch.as_tensor(_positions(batch.item_index, chosen))
                        v, v_mask = network.item_tokens(batch, positions)
                        t = network.encode_text(torch.as_tensor(tokens[chosen], dtype=torch.float32))
                        t_mask = torch.as_tensor(mask[chosen])
                        parts["token"] = self.beta * token_loss(v, v_mask, t, t_mask, network.log_scale_token)
                if not parts:
                    continue
                total = torch.stack(list(parts.values())).sum()
                if not torch.isfinite(total):
                    raise TrainingError(f"UrbanVLP: the loss became {float(total.detach())} at epoch {epoch}; "
                                        "lower the learning rate")
                optimizer.zero_grad()
                total.backward()
                torch.nn.utils.clip_grad_norm_(network.parameters(), 5.0)
                optimizer.step()
                for name, value in parts.items():
                    totals[name] += float(value.detach())
                n_batches += 1
            self.losses_.append({k: v / max(n_batches, 1) for k, v in totals.items()})
            if self.on_epoch is not None:
                self.on_epoch(epoch, self.epochs)
        network.eval()
        self.network_ = network
        self.input_notes_ = list(inputs.notes)
        return self

    def _token_items(self, inputs: VLPInputs) -> np.ndarray:
        if inputs.item_tokens is None or inputs.item_token_mask is None:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(inputs.item_token_mask.any(axis=1))

    # -- inference -------------------------------------------------------------------------------
    def transform(self, city: CityData) -> pd.DataFrame:
        self._check_fitted("network_")
        return self.transform_inputs(self.inputs(city))

    def transform_inputs(self, inputs: VLPInputs, batch_size: int = 512) -> pd.DataFrame:
        """Embed every region of precomputed inputs with the frozen towers."""
        self._check_fitted("network_")
        parts = self._check_params()
        inputs.validate()
        network = self.network_
        index = _Index(inputs.item_region, inputs.n_regions)
        chunks = []
        with torch.no_grad():
            for start in range(0, inputs.n_regions, batch_size):
                regions = np.arange(start, min(start + batch_size, inputs.n_regions))
                batch = make_batch(inputs, index, regions)
                out = network.branches(batch)
                out["fused"] = F.normalize(out["fused"], dim=-1)
                out["text"] = network.encode_text(batch.tile_text)
                chunks.append(torch.cat([out[p] for p in parts], dim=1).numpy())
        values = np.concatenate(chunks)
        if not np.isfinite(values).all():
            raise TrainingError("UrbanVLP: the embedding has NaN values; lower the learning rate")
        return as_embedding(values, inputs.region_ids)

    def text_embedding(self, text: np.ndarray) -> np.ndarray:
        """Frozen sentence vectors through the aligned text tower (for CLIPScore)."""
        self._check_fitted("network_")
        with torch.no_grad():
            return self.network_.encode_text(torch.as_tensor(text, dtype=torch.float32)).numpy()

    def image_embedding(self, image: np.ndarray) -> np.ndarray:
        """Frozen image features through the aligned image tower (for CLIPScore)."""
        self._check_fitted("network_")
        with torch.no_grad():
            return self.network_.encode_image(torch.as_tensor(image, dtype=torch.float32)).numpy()


def _positions(haystack: np.ndarray, needles: np.ndarray) -> np.ndarray:
    lookup = {int(v): k for k, v in enumerate(haystack)}
    return np.array([lookup[int(v)] for v in needles], dtype=np.int64)

