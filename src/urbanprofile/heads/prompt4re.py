"""ToPT's Prompt4RE head: frozen prompt vectors aligned to region embeddings by multi-head cross-attention.

Equations (2)-(4) of ToPT (section 2.2.3), with E the region embeddings (queries) and P the prompt vectors
(keys and values):

    att_i = Softmax(E W_Q^(i) (P W_K^(i))^T / sqrt(d_i)) P W_V^(i)          (2)
    MHA(E, P) = Concat(att_1, ..., att_L)                                    (3)
    P' = LayerNorm(MHA(E, P) + E W_res)                                      (4)

then a linear layer S = P' W_S (S has the width of E), F = [E || S], and a fully connected layer gives the
prediction; the loss is the mean squared error. Attention weights get dropout.

Start (``ridge_start``): as in the released code the output layer's weights on E start from a ridge fit on
the training regions; here that fit is the project's ``ridge`` head itself (:class:`RidgeProbe`, its
alpha, log1p features, scaling and log1p target chosen by inner CV on the training regions, with the same
seed and groups as the ``ridge`` head gets), and the output weights on S (or on P without alignment) start
at zero. So the untrained head (epoch 0) predicts exactly what the ``ridge`` head predicts: the head's
inputs E are the probe's transformed features (log1p when it chose it; then standardised, which a linear
map absorbs), its target is the probe's target (log1p(y) when it chose it: the head is then trained, and
its epochs chosen, on the log target, and predictions are back-transformed and capped as the probe's).
Training adds the prompt path as a residual (by default the ridge part stays fixed, ``train_start``), and
the inner epoch search may keep epoch 0. Inside the epoch search each inner model starts from a ridge fit
(the probe's chosen alpha and transforms) on its own inner training rows only, so epoch 0 is scored on
rows its start never saw.

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
from sklearn.utils.validation import check_is_fitted
from torch import nn

from urbanprofile.heads.neural import Scaler, TrainSettings, check_xy, fit_module, inner_folds
from urbanprofile.heads.probes import RidgeProbe, TargetTransform, make_probe, ridge_coefficients

#: Where the output layer starts (see :class:`Prompt4REHead`).
RIDGE_STARTS = ("tuned", "paper", "none")


class _Prompt4RE(nn.Module):
    def __init__(
        self, d_region: int, d_prompt: int, n_prompts: int, width: int, n_heads: int, dropout: float,
        align: bool, attention: str, init: tuple[np.ndarray, float] | None, train_x: np.ndarray,
        train_start: bool = True,
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
        # The FNN on F = [E || S] (or [E || P]) as two parts: out_e on E (with the bias), out_p on the rest.
        self.out_e = nn.Linear(d_region, 1)
        self.out_p = nn.Linear(d_region if align else d_prompt * n_prompts, 1, bias=False)
        if init is None:
            nn.init.normal_(self.out_e.weight, std=0.01)
            nn.init.normal_(self.out_p.weight, std=0.01)
        else:  # the E part starts at the ridge solution, the prompt part at zero: epoch 0 is that ridge fit
            with torch.no_grad():
                self.out_e.weight[0] = torch.as_tensor(init[0], dtype=torch.float32)
                self.out_e.bias[0] = float(init[1])
                self.out_p.weight.zero_()
            self.out_e.requires_grad_(train_start)  # frozen: training only adds the prompt path as a residual
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
            return self.out_e(e) + self.out_p(p.reshape(len(x), -1)), x.new_zeros(())
        q = self._heads(self.w_q(e))  # (n, L, dh)
        if self.attention == "all" and self.training:
            own_k = own_v = own_scores = None  # the own prompts are in the bank already
        else:
            own_k, own_v = self._heads(self.w_k(p)), self._heads(self.w_v(p))  # (n, k, L, dh)
            own_scores = torch.einsum("nld,nkld->nlk", q, own_k)
        if self.attention == "all":
            if self.training:  # the training batch is the whole training fold: its prompts are the bank
                self.bank = p.reshape(-1, self.d_prompt).detach()
                bank_k, bank_v = self._heads(self.w_k(self.bank)), self._heads(self.w_v(self.bank))
                scores = torch.einsum("nld,mld->nlm", q, bank_k)
                values = bank_v.unsqueeze(0).expand(len(x), *bank_v.shape)
            else:  # the training bank plus the region's own prompt vector(s)
                assert own_scores is not None and own_v is not None
                bank_k, bank_v = self._heads(self.w_k(self.bank)), self._heads(self.w_v(self.bank))
                scores = torch.cat([torch.einsum("nld,mld->nlm", q, bank_k), own_scores], dim=2)
                values = torch.cat([bank_v.unsqueeze(0).expand(len(x), *bank_v.shape), own_v], dim=1)
        else:
            assert own_scores is not None and own_v is not None
            scores, values = own_scores, own_v
        weights = self.drop(torch.softmax(scores / math.sqrt(self.head_dim), dim=-1))  # eq. (2)
        mha = torch.einsum("nlm,nmld->nld", weights, values).reshape(len(x), -1)  # eq. (3)
        aligned = self.norm(mha + self.w_res(e))  # eq. (4)
        soft_prompt = self.w_s(aligned)
        return self.out_e(e) + self.out_p(soft_prompt), x.new_zeros(())


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
        ridge_start: ``tuned``: the output layer starts at the ``ridge`` head of ``nested``/``spatial`` (the
            tuned :class:`RidgeProbe`, its feature and target transforms adopted by the head; see the module
            docstring); ``paper``: at the ``ridge`` head of ``paper`` (Ridge, alpha = 1, raw features and
            target); ``none``: random output weights, raw target.
        train_start: Also train the start's weights on E. ``False`` (default) keeps the ridge part fixed, so
            training only adds the prompt path as a residual to the ``ridge`` head; ToPT's released code
            trains every weight (``True``). Without a ridge start every weight is trained.
        prompt_components: Prompt vectors are standardised and reduced to this many principal components of
            the training rows' prompts (at most rows - 1 are informative anyway).
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
        max_epochs: int = 150,
        patience: int = 25,
        ridge_start: str = "tuned",
        train_start: bool = False,
        prompt_components: int = 64,
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
        self.ridge_start = ridge_start
        self.train_start = train_start
        self.prompt_components = prompt_components
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
        if self.ridge_start not in RIDGE_STARTS:
            raise ValueError(f"ridge_start must be one of {', '.join(RIDGE_STARTS)}, got {self.ridge_start!r}")
        d_prompt = rest // self.n_prompts
        # The start: the ridge head's own fit on these rows (same seed and groups), whose transforms we adopt.
        self.probe_: RidgeProbe | None = None
        log_features = log_target = False
        feature_scale: np.ndarray | None = None
        if self.ridge_start != "none":
            probe = make_probe("ridge", self.ridge_start == "paper", self.random_state)
            assert isinstance(probe, RidgeProbe)
            self.probe_ = probe.fit(X[:, :d], y, groups=groups)
            log_features, log_target = bool(probe.log_features_), bool(probe.log_target_)
        self.log_features_, self.log_target_ = log_features, log_target
        self.target_ = TargetTransform(log_target, y, capped=self.probe_.capped_ if self.probe_ else True)
        self.e_scaler_ = Scaler(self._region_features(X))
        if self.probe_ is not None and not self.probe_.scale_:
            feature_scale = self.e_scaler_.std  # the probe fits unscaled features: undo the head's scaling
        # Prompt dimensions are standardised jointly over all prompts (LLM states have outlier dimensions).
        prompts = X[:, d:].reshape(len(X), self.n_prompts, d_prompt).reshape(-1, d_prompt)
        self.p_scaler_ = Scaler(prompts)
        # The training rows' prompts span at most (rows - 1) dimensions: keep their leading principal
        # components (fit on the training rows only), which makes attention over 4096-d LLM states cheap.
        from sklearn.decomposition import PCA

        n_components = max(1, min(self.prompt_components, len(prompts) - 1, d_prompt))
        self.p_pca_ = PCA(n_components=n_components, random_state=0).fit(self.p_scaler_.forward(prompts))
        self.p_unit_ = float(np.sqrt(self.p_pca_.explained_variance_[0])) or 1.0
        g = self.target_.forward(y)[:, None]
        self.y_scaler_ = Scaler(g)
        z = self._scale(X)
        d_prompt = n_components
        target = self.y_scaler_.forward(g)
        alpha = self.probe_.alpha_ if self.probe_ is not None else 0.0

        def start(x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, float] | None:
            """Ridge (the probe's alpha and transforms) on the rows a module is built for, in its units."""
            if self.probe_ is None:
                return None
            scale = feature_scale if feature_scale is not None else np.ones(d)
            coef, intercept = ridge_coefficients(x[:, :d] * scale, t[:, 0], alpha)
            return coef * scale, intercept

        settings = TrainSettings(max_epochs=self.max_epochs, lr=self.lr, weight_decay=self.weight_decay,
                                 patience=self.patience, val_fraction=0.2, inner_folds=inner_folds(len(X), None))
        self.module_, self.epochs_, self.cv_error_ = fit_module(
            lambda x, t: _Prompt4RE(d, d_prompt, self.n_prompts, self.width, self.n_heads, self.dropout,
                                    self.align, self.attention, start(x, t), x, self.train_start),
            z, target, settings, self.random_state, groups,
        )
        return self

    def _region_features(self, X: np.ndarray) -> np.ndarray:
        """E with the start probe's feature transform (log1p when it chose it, as the probe applies it)."""
        e = X[:, : int(self.n_region_features)]
        return np.log1p(np.clip(e, 0, None)) if self.log_features_ else e

    def _scale(self, X: np.ndarray) -> np.ndarray:
        d = int(self.n_region_features)
        e = self.e_scaler_.forward(self._region_features(X))
        d_prompt = (X.shape[1] - d) // self.n_prompts
        p = self.p_scaler_.forward(X[:, d:].reshape(-1, d_prompt))
        p = self.p_pca_.transform(p) / self.p_unit_
        return np.hstack([e, p.reshape(len(X), -1)])

    def predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self)  # sklearn's NotFittedError (one line), not an AttributeError
        X = np.asarray(X, dtype=float)
        self.module_.eval()
        with torch.no_grad():
            z, _ = self.module_(torch.as_tensor(self._scale(X), dtype=torch.float32))
        g = self.y_scaler_.inverse(z.numpy().astype(float))[:, 0]
        return np.clip(self.target_.inverse(g), 0, None)  # capped and clipped as the ridge probe's

    def chosen(self) -> dict[str, Any]:
        chosen = {"epochs": self.epochs_, "attention": self.attention if self.align else "none"}
        if self.probe_ is not None:
            chosen["start"] = self.probe_.chosen()
        return chosen
