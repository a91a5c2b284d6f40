"""Autoencoder baseline: an MLP that reconstructs the log-standardised raw views (torch)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.data.features import ALL_VIEWS, LogScaler, stacked_views
from urbanprofile.embedders.base import Embedder, as_embedding
from urbanprofile.errors import TrainingError


class AutoencoderEmbedder(Embedder):
    """Encode stacked views through a bottleneck trained to reconstruct them (no labels).

    Training runs a fixed number of full-batch Adam epochs: no epoch is chosen by any score.

    Args:
        n_components: Bottleneck size.
        hidden: Hidden layer width.
        epochs: Training epochs.
        lr: Adam learning rate.
        weight_decay: L2 penalty.
        views: Views to stack.
        random_state: Seed for the weight initialisation.
    """

    #: Called with (epoch, epochs) after each training epoch (the CLI and the runner show it as progress).
    on_epoch: Callable[[int, int], None] | None = None

    def __init__(
        self,
        n_components: int = 32,
        hidden: int = 256,
        epochs: int = 300,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        views: tuple[str, ...] = ALL_VIEWS,
        random_state: int | None = 0,
    ) -> None:
        self.n_components = n_components
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.views = views
        self.random_state = random_state

    @property
    def required_views(self) -> tuple[str, ...]:
        return tuple(self.views)

    def fit(self, city: CityData) -> AutoencoderEmbedder:
        import torch
        from torch import nn

        if self.n_components < 1 or self.hidden < 1 or self.epochs < 1:
            raise ValueError("n_components, hidden and epochs must be >= 1")
        raw = stacked_views(city, tuple(self.views))
        self.scaler_ = LogScaler().fit(raw)
        x = torch.as_tensor(self.scaler_.transform(raw), dtype=torch.float32)
        torch.manual_seed(0 if self.random_state is None else int(self.random_state))
        d = x.shape[1]
        self.encoder_ = nn.Sequential(nn.Linear(d, self.hidden), nn.GELU(), nn.Linear(self.hidden, self.n_components))
        decoder = nn.Sequential(nn.Linear(self.n_components, self.hidden), nn.GELU(), nn.Linear(self.hidden, d))
        params = list(self.encoder_.parameters()) + list(decoder.parameters())
        optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        self.loss_curve_: list[float] = []
        for epoch in range(self.epochs):
            optimizer.zero_grad()
            loss = torch.mean((decoder(self.encoder_(x)) - x) ** 2)
            if not torch.isfinite(loss):
                raise TrainingError(f"autoencoder: loss became {loss.item()} at epoch {epoch} (views {self.views})")
            loss.backward()
            optimizer.step()
            self.loss_curve_.append(float(loss.item()))
            if self.on_epoch is not None:
                self.on_epoch(epoch + 1, self.epochs)
        self.encoder_.eval()
        return self

    def transform(self, city: CityData) -> pd.DataFrame:
        import torch

        self._check_fitted("encoder_")
        x = torch.as_tensor(self.scaler_.transform(stacked_views(city, tuple(self.views))), dtype=torch.float32)
        with torch.no_grad():
            z = self.encoder_(x).numpy()
        return as_embedding(np.asarray(z, dtype=float), city.region_ids)
