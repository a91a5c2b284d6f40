"""UrbanFusion: stochastic multimodal fusion of frozen modality encoders (Mühlematter et al., 2025).

Each modality of a region (see :mod:`urbanprofile.embedders.multimodal.modalities`: GeoCLIP location, MiniLM captions,
street-view captions, EfficientNet images, POI / land-use / mobility profiles) is encoded by a frozen
encoder, standardised, and projected to one ``d_model`` token (plus a learned modality embedding). A
Transformer encoder fuses the tokens that are present; the region vector is every trained modality's fused
token side by side (``readout="tokens"``, the default; an absent modality's slot is filled from the tokens
present) or their mean (``readout="mean"``).

Pretraining is Stochastic Multimodal Fusion (SMF): for every region of a minibatch two random non-empty
subsets of its available modalities are drawn (each modality kept with probability ``keep_prob``); the two
fused views are pulled together by a symmetric InfoNCE loss with a learnable temperature, and every
available modality's standardised embedding is reconstructed from each view (MSE, weight ``lambda_rec``:
the paper's summary gives about 0.06; the default here is 1.0, see the README's diagnosis: at 0.06 the
solved contrastive task keeps an identity code and loses what a probe needs). Several cities that share
modalities can be pooled (``pretrain``), and the target city may be left out (``include_target=False``: the
out-of-region setting). At inference any subset of the trained modalities can be used (``modalities``);
regions lacking one simply have one token less.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.data.registry import load_dataset
from urbanprofile.embedders.base import Embedder, as_embedding
from urbanprofile.embedders.multimodal.modalities import RegionModalities, check_modalities, region_modalities
from urbanprofile.errors import MethodUnavailableError, TrainingError


def city_modalities(city: CityData, names: Sequence[str] | None, progress: bool = True) -> RegionModalities:
    """The city's region modalities, computed once per city object (kept in ``city.cache``)."""
    chosen = tuple(check_modalities(city, names))
    cached: dict[str, Any] = city.cache.setdefault("region_modalities", {})
    missing = [m for m in chosen if m not in cached]
    if missing:
        computed = region_modalities(city, missing, progress=progress)
        for m in missing:
            cached[m] = (computed.values[m], computed.present[m], computed.skipped.get(m, {}))
    out = RegionModalities(region_ids=city.region_ids)
    for m in chosen:
        out.values[m], out.present[m], skipped = cached[m]
        if skipped:
            out.skipped[m] = skipped
    return out


#: Region read-outs of the fused tokens.
READOUTS = ("mean", "tokens")


class UrbanFusionEmbedder(Embedder):
    """Transformer fusion of frozen modality encoders, pretrained with stochastic multimodal fusion.

    Args:
        modalities: Modalities used at inference (``None``: every trained modality the city has).
        train_modalities: Modalities used in pretraining (``None``: every modality the target city has).
        pretrain: Names of further datasets pooled into pretraining (e.g. the other CityView city).
        include_target: Whether the target city's regions are part of pretraining (``False``: pretrain only on
            ``pretrain`` and embed the target city, unseen).
        d_model: Token and region-vector width.
        n_layers: Transformer layers.
        n_heads: Attention heads.
        dropout: Dropout in the Transformer.
        epochs: Pretraining epochs (fixed; never chosen by looking at labels).
        batch_size: Regions per minibatch (the InfoNCE negatives).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        keep_prob: Probability that an available modality is kept in a view.
        lambda_rec: Weight of the reconstruction loss.
        temperature: Initial InfoNCE temperature (learned).
        readout: ``"tokens"`` (every trained modality's fused token side by side, ``d_model`` x modalities
            wide; the default) or ``"mean"`` (the mean of the present fused tokens, ``d_model`` wide).
        random_state: Seed.
    """

    on_epoch: Callable[[int, int], None] | None = None

    def __init__(
        self,
        modalities: Sequence[str] | None = None,
        train_modalities: Sequence[str] | None = None,
        pretrain: Sequence[str] = (),
        include_target: bool = True,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        dropout: float = 0.1,
        epochs: int = 40,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        keep_prob: float = 0.5,
        lambda_rec: float = 1.0,
        temperature: float = 0.07,
        readout: str = "tokens",
        random_state: int | None = None,
    ) -> None:
        self.modalities = modalities
        self.train_modalities = train_modalities
        self.pretrain = pretrain
        self.include_target = include_target
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.dropout = dropout
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.keep_prob = keep_prob
        self.lambda_rec = lambda_rec
        self.temperature = temperature
        self.readout = readout
        self.random_state = random_state

    # -- fitting ------------------------------------------------------------------------------------
    def _validate(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not 0 < self.keep_prob <= 1:
            raise ValueError(f"keep_prob must be in (0, 1], got {self.keep_prob}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("epochs must be >= 1 and batch_size >= 2")
        if self.lambda_rec < 0 or self.temperature <= 0:
            raise ValueError("lambda_rec must be >= 0 and temperature > 0")
        if self.readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {self.readout!r}")
        if not self.include_target and not self.pretrain:
            raise ValueError("include_target=False needs at least one dataset in pretrain")

    def fit(self, city: CityData) -> UrbanFusionEmbedder:
        import torch

        self._validate()
        names = check_modalities(city, self.train_modalities)
        if self.modalities is not None:
            unknown = [m for m in self.modalities if m not in names]
            if unknown:
                raise MethodUnavailableError(f"inference modality {unknown[0]!r} is not among the trained {names}")
        sources = [city_modalities(city, names)] if self.include_target else []
        for other in self.pretrain:
            other_city = load_dataset(other)
            have = [m for m in names if m in check_modalities(other_city, None)]
            sources.append(city_modalities(other_city, have))
        # Pool the cities: a modality a city lacks (or with another width) is absent for all its regions.
        dims = {m: sources[0].values[m].shape[1] if m in sources[0].values else None for m in names}
        for src in sources:
            for m in names:
                if dims[m] is None and m in src.values:
                    dims[m] = src.values[m].shape[1]
        self.names_ = [m for m in names if dims[m] is not None]
        self.dims_ = {m: int(dims[m] or 0) for m in self.names_}
        x, present = self._pool(sources)
        self.mean_, self.scale_ = {}, {}
        for m in self.names_:
            rows = x[m][present[m]]
            if len(rows) == 0:
                raise MethodUnavailableError(f"no region has the {m!r} modality in the pretraining data")
            self.mean_[m] = rows.mean(0)
            self.scale_[m] = rows.std(0) + 1e-6
        z = {m: self.standardise(m, x[m]) for m in self.names_}

        torch.manual_seed(0 if self.random_state is None else int(self.random_state))
        rng = np.random.default_rng(self.random_state)
        self.model_ = _build_model(self.dims_, self.names_, self.d_model, self.n_layers, self.n_heads, self.dropout,
                                   self.temperature)
        opt = torch.optim.AdamW(self.model_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        xs = [torch.from_numpy(z[m]) for m in self.names_]
        pres = torch.from_numpy(np.column_stack([present[m] for m in self.names_]))
        n = pres.shape[0]
        self.loss_history_: list[float] = []
        start = time.perf_counter()
        self.model_.train()
        for epoch in range(self.epochs):
            order = rng.permutation(n)
            total, batches = 0.0, 0
            for begin in range(0, n, self.batch_size):
                idx = torch.from_numpy(order[begin : begin + self.batch_size])
                if len(idx) < 2:
                    continue
                batch = [v[idx] for v in xs]
                avail = pres[idx]
                view1, view2 = _subset(avail, self.keep_prob, rng), _subset(avail, self.keep_prob, rng)
                fused1, fused2 = self.model_(batch, view1), self.model_(batch, view2)
                loss = self.model_.contrastive(fused1, fused2)
                if self.lambda_rec > 0:
                    rec = (self.model_.reconstruction(fused1, batch, avail)
                           + self.model_.reconstruction(fused2, batch, avail)) / 2
                    loss = loss + self.lambda_rec * rec
                if not torch.isfinite(loss):
                    raise TrainingError(f"urbanfusion: loss became {loss.item()} at epoch {epoch + 1}")
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    self.model_.logit_scale.clamp_(0, np.log(100.0))
                total += loss.item()
                batches += 1
            self.loss_history_.append(total / max(batches, 1))
            if self.on_epoch is not None:
                self.on_epoch(epoch + 1, self.epochs)
        self.model_.eval()
        self.train_seconds_ = time.perf_counter() - start
        self.n_pretrain_regions_ = int(n)
        return self

    def _pool(self, sources: list[RegionModalities]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        x: dict[str, list[np.ndarray]] = {m: [] for m in self.names_}
        present: dict[str, list[np.ndarray]] = {m: [] for m in self.names_}
        for src in sources:
            n = len(src.region_ids)
            for m in self.names_:
                ok = m in src.values and src.values[m].shape[1] == self.dims_[m]
                x[m].append(src.values[m] if ok else np.full((n, self.dims_[m]), np.nan, np.float32))
                present[m].append(src.present[m] if ok else np.zeros(n, bool))
        return ({m: np.concatenate(v) for m, v in x.items()}, {m: np.concatenate(v) for m, v in present.items()})

    def standardise(self, m: str, values: np.ndarray) -> np.ndarray:
        """Scale one modality's features as in training (absent rows become 0, which the mask hides).

        Args:
            m: Modality name, one of ``names_``.
            values: Its raw features, ``(n_regions, width)``.

        Returns:
            float32 features, standardised with the training mean and scale and clipped to ±10.
        """
        out = (values - self.mean_[m]) / self.scale_[m]
        return np.nan_to_num(np.clip(out, -10, 10), nan=0.0).astype(np.float32)  # absent rows are masked

    # -- inference ----------------------------------------------------------------------------------
    def transform(self, city: CityData) -> pd.DataFrame:
        import torch

        self._check_fitted("model_")
        names = list(self.modalities) if self.modalities is not None else [
            m for m in self.names_ if m in check_modalities(city, None)]
        unknown = [m for m in names if m not in self.names_]
        if unknown:
            raise MethodUnavailableError(f"modality {unknown[0]!r} was not trained (trained: {self.names_})")
        feats = city_modalities(city, names)
        mask = np.column_stack([feats.present[m] if m in names else np.zeros(city.n_regions, bool)
                                for m in self.names_])
        empty = ~mask.any(1)
        if empty.any():
            raise MethodUnavailableError(
                f"{int(empty.sum())} region(s) of {city.name} (e.g. {city.region_ids[int(np.argmax(empty))]}) have "
                f"none of the modalities {names}; add one they all have (e.g. location)"
            )
        xs = [torch.from_numpy(self.standardise(m, feats.values[m]) if m in names
                               else np.zeros((city.n_regions, self.dims_[m]), np.float32)) for m in self.names_]
        self.modalities_used_ = names
        self.skipped_ = feats.skipped
        out = []
        with torch.inference_mode():
            for begin in range(0, city.n_regions, 1024):
                sl = slice(begin, begin + 1024)
                out.append(self.model_([v[sl] for v in xs], torch.from_numpy(mask[sl]),
                                       readout=self.readout).numpy())
        return as_embedding(np.concatenate(out), city.region_ids)


def _subset(avail: Any, keep_prob: float, rng: np.random.Generator) -> Any:
    """A random non-empty subset of each row's available modalities (boolean (B, M))."""
    import torch

    avail_np = avail.numpy()
    keep = (rng.random(avail_np.shape) < keep_prob) & avail_np
    for row in np.where(~keep.any(1))[0]:
        choices = np.flatnonzero(avail_np[row])
        keep[row, rng.choice(choices)] = True
    return torch.from_numpy(keep)


def _build_model(dims: dict[str, int], names: list[str], d_model: int, n_layers: int, n_heads: int,
                 dropout: float, temperature: float) -> Any:
    import torch
    from torch import nn

    class Fusion(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.project = nn.ModuleList(nn.Sequential(nn.Linear(dims[m], d_model), nn.LayerNorm(d_model))
                                         for m in names)
            self.modality = nn.Parameter(torch.randn(len(names), d_model) * 0.02)
            layer = nn.TransformerEncoderLayer(d_model, n_heads, 2 * d_model, dropout, batch_first=True,
                                               norm_first=True)
            self.fusion = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
            self.head = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model))
            self.decode = nn.ModuleList(nn.Linear(d_model, dims[m]) for m in names)
            self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / temperature))))

        def forward(self, xs: list[torch.Tensor], mask: torch.Tensor, readout: str = "mean") -> torch.Tensor:
            tokens = torch.stack([p(x) for p, x in zip(self.project, xs, strict=True)], dim=1) + self.modality
            fused = self.fusion(tokens, src_key_padding_mask=~mask)
            if readout == "tokens":
                return fused.reshape(len(fused), -1)
            weights = mask.unsqueeze(-1).to(fused.dtype)
            return (fused * weights).sum(1) / weights.sum(1).clamp(min=1.0)

        def contrastive(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            ha = nn.functional.normalize(self.head(a), dim=-1)
            hb = nn.functional.normalize(self.head(b), dim=-1)
            logits = ha @ hb.T * self.logit_scale.exp()
            target = torch.arange(len(a))
            return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2

        def reconstruction(self, fused: torch.Tensor, xs: list[torch.Tensor], avail: torch.Tensor) -> torch.Tensor:
            losses = []
            for k, dec in enumerate(self.decode):
                rows = avail[:, k]
                if rows.any():
                    losses.append(((dec(fused[rows]) - xs[k][rows]) ** 2).mean())
            return torch.stack(losses).mean()

    return Fusion()
