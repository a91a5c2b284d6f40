"""ToPT's Prompt4RE head: frozen prompt vectors aligned to region embeddings by multi-head cross-attention.

Equations (2)-(4) of ToPT (section 2.2.3), with E the region embeddings (queries) and P the prompt vectors
(keys and values):

    att_i = Softmax(E W_Q^(i) (P W_K^(i))^T / sqrt(d_i)) P W_V^(i)          (2)
    MHA(E, P) = Concat(att_1, ..., att_L)                                    (3)
    P' = LayerNorm(MHA(E, P) + E W_res)                                      (4)

then a linear layer S = P' W_S (S has the width of E), F = [E || S], and a fully connected layer gives the
prediction; the loss is the mean squared error. As in the released code, the output layer's weights on E
start from a ridge fit on the training regions (so training starts at the linear probe), and attention
weights get dropout.

Two alignment modes:

* ``attention="all"`` (the released code): each region attends over the prompt vectors of *all training
  regions* (full-batch training, so the keys are exactly the training fold). At prediction time a region
  attends over that training bank plus its own prompt vector. Test regions never enter the bank.
* ``attention="region"``: each region attends only over its own prompt vector(s). With one vector per region
  the softmax weight is 1 and the alignment reduces to ``P W_V`` (still followed by eq. (4)).

``align=False`` is ToPT's "w/o P-R alignment" ablation: F = [E || P] (plain concatenation) and the same FNN.

Input layout (scikit-learn contract): ``X = [E | P]``, the first ``n_region_features`` columns the
embedding, the rest ``n_prompts`` prompt vectors per region side by side.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, RegressorMixin
from torch import nn

from urbanprofile.heads.neural import Scaler, TrainSettings, check_xy, fit_module, inner_folds


class _Prompt4RE(nn.Module):
    def __init__(
        self, d_region: int, d_prompt: int, n_prompts: int, width: int, n_heads: int, dropout: float,
        align: bool, attention: str, init: tuple[np.ndarray, float] | None, train_x: np.ndarray,
    ) -> None:
        super().__init__()
        self.d_region, self.d_prompt, self.n_prompts = d_region, d_prompt, n_prompts
        self.align, self.attention, self.n_heads = align, attention, n_heads
        self.head_dim = width // n_heads
        if align:
            self.w_q = nn.Linear(d_region, width, bias=False)
            self.w_k = nn.Linear(d_prompt, width, bias=False)
            self.w_v = nn.Linear(d_prompt, width, bias=False)
            self.w_res = nn.Linear(d_region, width, bias=False)
            self.norm = nn.LayerNorm(width)
            self.w_s = nn.Linear(width, d_region)
            self.drop = nn.Dropout(dropout)
            self.out = nn.Linear(2 * d_region, 1)
        else:
            self.out = nn.Linear(d_region + d_prompt * n_prompts, 1)
        nn.init.normal_(self.out.weight, std=0.01)
        if init is not None:  # the E part starts at the ridge solution
            with torch.no_grad():
                self.out.weight[0, :d_region] = torch.as_tensor(init[0], dtype=torch.float32)
                self.out.bias[0] = float(init[1])
        # The bank starts as the training rows' prompts (so even an untrained model attends over them).
        bank = np.asarray(train_x[:, d_region:], dtype=np.float32).reshape(-1, d_prompt)
        self.register_buffer("bank", torch.as_tensor(bank))

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = x[:, : self.d_region]
        p = x[:, self.d_region:].reshape(len(x), self.n_prompts, self.d_prompt)
        return e, p

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*t.shape[:-1], self.n_heads, self.head_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e, p = self._split(x)
        if not self.align:
            return self.out(torch.cat([e, p.reshape(len(x), -1)], dim=1)), x.new_zeros(())
        q = self._heads(self.w_q(e))  # (n, L, dh)
        own_k, own_v = self._heads(self.w_k(p)), self._heads(self.w_v(p))  # (n, k, L, dh)
        own_scores = torch.einsum("nld,nkld->nlk", q, own_k)
        if self.attention == "all":
            if self.training:  # the training batch is the whole training fold: its prompts are the bank
                self.bank = p.reshape(-1, self.d_prompt).detach()
                bank_k, bank_v = self._heads(self.w_k(self.bank)), self._heads(self.w_v(self.bank))
                scores = torch.einsum("nld,mld->nlm", q, bank_k)
                values = bank_v.unsqueeze(0).expand(len(x), *bank_v.shape)
            else:  # the training bank plus the region's own prompt vector(s)
                bank_k, bank_v = self._heads(self.w_k(self.bank)), self._heads(self.w_v(self.bank))
                scores = torch.cat([torch.einsum("nld,mld->nlm", q, bank_k), own_scores], dim=2)
                values = torch.cat([bank_v.unsqueeze(0).expand(len(x), *bank_v.shape), own_v], dim=1)
        else:
            scores, values = own_scores, own_v
        weights = self.drop(torch.softmax(scores / math.sqrt(self.head_dim), dim=-1))  # eq. (2)
        mha = torch.einsum("nlm,nmld->nld", weights, values).reshape(len(x), -1)  # eq. (3)
        aligned = self.norm(mha + self.w_res(e))  # eq. (4)
        soft_prompt = self.w_s(aligned)
        return self.out(torch.cat([e, soft_prompt], dim=1)), x.new_zeros(())


class Prompt4REHead(BaseEstimator, RegressorMixin):
    """Prompt4RE on one task: ``X = [E | P]``, epochs chosen on an inner split of the training regions.

    Args:
        n_region_features: Width of E (the first columns of X).
        n_prompts: Prompt vectors per region (side by side in the remaining columns).
        align: Cross-attention alignment (``False``: plain concatenation, ToPT's ablation).
        attention: ``all`` (attend over every training region's prompts) or ``region`` (own prompts only).
        width: Attention width (split over ``n_heads``).
        n_heads: Attention heads L.
        dropout: Dropout on the attention weights.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        max_epochs: Upper bound of the epoch search.
        patience: Early stopping patience on the inner validation split.
        ridge_init: Start the output layer's E weights from a ridge fit on the training regions.
        random_state: Seed.
    """

    def __init__(
        self,
        n_region_features: int = 0,
        n_prompts: int = 1,
        align: bool = True,
        attention: str = "all",
        width: int = 64,
        n_heads: int = 4,
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        max_epochs: int = 400,
        patience: int = 50,
        ridge_init: bool = True,
        random_state: int | None = 0,
    ) -> None:
        self.n_region_features = n_region_features
        self.n_prompts = n_prompts
        self.align = align
        self.attention = attention
        self.width = width
        self.n_heads = n_heads
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.patience = patience
        self.ridge_init = ridge_init
        self.random_state = random_state

    def fit(self, X: Any, y: Any, groups: np.ndarray | None = None) -> Prompt4REHead:
        X, y = check_xy(X, y, multi=False)
        d = int(self.n_region_features)
        rest = X.shape[1] - d
        if d < 1 or self.n_prompts < 1 or rest < self.n_prompts or rest % self.n_prompts:
            raise ValueError(
                f"X has {X.shape[1]} columns: not {d} embedding columns plus {self.n_prompts} prompt vectors"
            )
        if self.attention not in ("all", "region"):
            raise ValueError(f"attention must be 'all' or 'region', got {self.attention!r}")
        if self.width % self.n_heads:
            raise ValueError(f"width={self.width} is not divisible by n_heads={self.n_heads}")
        d_prompt = rest // self.n_prompts
        self.e_scaler_ = Scaler(X[:, :d])
        # Prompt dimensions are standardised jointly over all prompts (LLM states have outlier dimensions).
        prompts = X[:, d:].reshape(len(X), self.n_prompts, d_prompt).reshape(-1, d_prompt)
        self.p_scaler_ = Scaler(prompts)
        self.y_scaler_ = Scaler(y[:, None])
        z = self._scale(X)
        target = self.y_scaler_.forward(y[:, None])
        init = None
        if self.ridge_init:
            from sklearn.linear_model import RidgeCV

            ridge = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(z[:, :d], target[:, 0])
            init = (ridge.coef_, float(ridge.intercept_))
        settings = TrainSettings(max_epochs=self.max_epochs, lr=self.lr, weight_decay=self.weight_decay,
                                 patience=self.patience, val_fraction=0.2, inner_folds=inner_folds(len(X), None))
        self.module_, self.epochs_, self.cv_error_ = fit_module(
            lambda x, t: _Prompt4RE(d, d_prompt, self.n_prompts, self.width, self.n_heads, self.dropout,
                                    self.align, self.attention, init, x),
            z, target, settings, self.random_state, groups,
        )
        return self

    def _scale(self, X: np.ndarray) -> np.ndarray:
        d = int(self.n_region_features)
        e = self.e_scaler_.forward(X[:, :d])
        d_prompt = (X.shape[1] - d) // self.n_prompts
        p = self.p_scaler_.forward(X[:, d:].reshape(len(X), self.n_prompts, d_prompt)).reshape(len(X), -1)
        return np.hstack([e, p])

    def predict(self, X: Any) -> np.ndarray:
        X = np.asarray(X, dtype=float)
        self.module_.eval()
        with torch.no_grad():
            z, _ = self.module_(torch.as_tensor(self._scale(X), dtype=torch.float32))
        return np.clip(self.y_scaler_.inverse(z.numpy().astype(float))[:, 0], 0, None)

    def chosen(self) -> dict[str, Any]:
        return {"epochs": self.epochs_, "attention": self.attention if self.align else "none"}
