"""UrbanMoE head: a sparse multi-modal mixture of experts predicting several indicators jointly.

What the UrbanMoE paper (WWW 2026) states: per-modality features are routed by a sparse gate to
specialised sub-networks, with shared and task-specific experts, a gating threshold (0.01 in its
hyper-parameter study) and a small region embedding (6 in its study); all indicators are predicted
jointly. Its exact equations were not available to us, so the following are our choices
(``../shared/seeds/details-urbanmoe-urban-r1.md``, [OURS]):

* one input block per modality, each projected to a shared width (Linear + LayerNorm + GELU), the blocks
  concatenated and mapped to a small region embedding (``region_dim``);
* per task, a noisy gate (Shazeer et al. 2017: logits plus Gaussian noise scaled by a learned softplus,
  during training only) over that task's candidate experts: the ``n_shared`` shared experts plus the task's
  own ``n_task_experts`` experts; softmax, weights under ``threshold`` zeroed and the rest renormalised
  (optionally only the ``top_k`` largest kept);
* a Switch-style load-balancing loss per task (fraction routed x mean gate probability, times the number of
  candidates), weighted by ``balance_weight``;
* one output tower per indicator plus a linear path that starts at the ridge solution (as our MLP heads
  and the released Prompt4RE code do: on a few dozen regions an expert network alone loses to ridge);
  the loss is the mean squared error over labelled cells only (missing
  labels, e.g. CityView's GDP fill values, are masked), each task weighted equally.

Epochs are chosen on an inner split of the training regions (early stopping), then the model is refit on
all of them (see :mod:`urbanprofile.heads.neural`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn

from urbanprofile.heads.neural import RidgeSkip, Scaler, TrainSettings, check_xy, fit_module, inner_folds


class _MoE(nn.Module):
    def __init__(
        self, blocks: tuple[int, ...], n_tasks: int, width: int, region_dim: int, expert_hidden: int,
        n_shared: int, n_task_experts: int, threshold: float, top_k: int | None, noise: bool,
        balance_weight: float, dropout: float, skip: RidgeSkip | None,
    ) -> None:
        super().__init__()
        self.skip = skip
        self.blocks = blocks
        self.n_tasks, self.n_shared, self.n_task_experts = n_tasks, n_shared, n_task_experts
        self.threshold, self.top_k, self.noise, self.balance_weight = threshold, top_k, noise, balance_weight
        self.project = nn.ModuleList(
            nn.Sequential(nn.Linear(size, width), nn.LayerNorm(width), nn.GELU()) for size in blocks
        )
        self.embed = nn.Sequential(nn.Dropout(dropout), nn.Linear(width * len(blocks), region_dim), nn.GELU())
        n_experts = n_shared + n_tasks * n_task_experts
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(region_dim, expert_hidden), nn.GELU(), nn.Dropout(dropout),
                          nn.Linear(expert_hidden, expert_hidden), nn.GELU())
            for _ in range(n_experts)
        )
        n_candidates = n_shared + n_task_experts
        self.gates = nn.ModuleList(nn.Linear(region_dim, n_candidates) for _ in range(n_tasks))
        self.gate_noise = nn.ModuleList(nn.Linear(region_dim, n_candidates) for _ in range(n_tasks))
        towers = [nn.Linear(expert_hidden, 1) for _ in range(n_tasks)]
        if skip is not None:  # start exactly at the per-task ridge solution
            for tower in towers:
                nn.init.zeros_(tower.weight)
                nn.init.zeros_(tower.bias)
        self.towers = nn.ModuleList(towers)

    def candidates(self, task: int) -> list[int]:
        """Expert indices a task's gate chooses from: the shared experts, then the task's own."""
        own = self.n_shared + task * self.n_task_experts
        return [*range(self.n_shared), *range(own, own + self.n_task_experts)]

    def route(self, h: torch.Tensor, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse gate weights (n, candidates) after threshold/top-k and renormalisation, and the dense ones."""
        logits = self.gates[task](h)
        if self.training and self.noise:
            scale = nn.functional.softplus(self.gate_noise[task](h))
            logits = logits + torch.randn_like(logits) * scale
        dense = torch.softmax(logits, dim=-1)
        keep = dense >= self.threshold
        if self.top_k is not None and self.top_k < dense.shape[1]:
            kth = dense.topk(self.top_k, dim=-1).values[:, -1:]
            keep &= dense >= kth
        # Never drop every expert: the most probable one always stays.
        keep |= dense == dense.max(dim=-1, keepdim=True).values
        sparse = dense * keep
        return sparse / sparse.sum(dim=-1, keepdim=True), dense

    def region_embedding(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, list(self.blocks), dim=1)
        return self.embed(torch.cat([proj(part) for proj, part in zip(self.project, parts, strict=True)], dim=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.region_embedding(x)
        expert_out = torch.stack([expert(h) for expert in self.experts], dim=1)  # (n, E, hidden)
        outputs, balance = [], x.new_zeros(())
        for t in range(self.n_tasks):
            weights, dense = self.route(h, t)
            mixed = (weights.unsqueeze(-1) * expert_out[:, self.candidates(t)]).sum(dim=1)
            outputs.append(self.towers[t](mixed))
            routed = (weights > 0).float().mean(dim=0)
            balance = balance + weights.shape[1] * (routed * dense.mean(dim=0)).sum()
        out = torch.cat(outputs, dim=1)
        if self.skip is not None:
            out = out + self.skip(x)
        return out, self.balance_weight * balance / self.n_tasks


class UrbanMoE(BaseEstimator, RegressorMixin):
    """Sparse multi-modal mixture of experts over several indicators (targets may be NaN: masked loss).

    Args:
        blocks: Column counts of the modality blocks of X, in order; ``None``: X is one block.
        block_names: Names of the blocks (for reports); default ``block0, block1, ...``.
        width: Shared width each modality is projected to.
        region_dim: Width of the region embedding the experts read (UrbanMoE's study found 6 best).
        expert_hidden: Hidden width of each expert.
        n_shared: Shared experts (candidates of every task's gate).
        n_task_experts: Task-specific experts per task.
        threshold: Gate weights under this are zeroed and the rest renormalised (UrbanMoE: 0.01).
        top_k: Keep only the k largest gate weights as well (``None``: threshold only).
        noise: Noisy gating during training.
        balance_weight: Weight of the load-balancing loss.
        dropout: Dropout in the embedding and the experts.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        max_epochs: Upper bound of the epoch search on the inner split.
        patience: Early stopping patience.
        batch_size: Mini-batch size (0: full batch).
        ridge_skip: Add a per-task linear path from the inputs that starts at the ridge solution of the
            training rows (towers start at zero, so epoch 0 is ridge; the same start as the ``mlp`` heads).
        inner_folds: Inner folds averaged for the epoch search (``None``: 2 below 500 regions, else 1).
        random_state: Seed.
    """

    def __init__(
        self,
        blocks: tuple[int, ...] | None = None,
        block_names: tuple[str, ...] | None = None,
        width: int = 32,
        region_dim: int = 16,
        expert_hidden: int = 32,
        n_shared: int = 2,
        n_task_experts: int = 2,
        threshold: float = 0.01,
        top_k: int | None = None,
        noise: bool = True,
        balance_weight: float = 0.01,
        dropout: float = 0.1,
        lr: float = 3e-3,
        weight_decay: float = 1e-3,
        max_epochs: int = 300,
        patience: int = 30,
        batch_size: int = 0,
        ridge_skip: bool = True,
        inner_folds: int | None = None,
        random_state: int | None = 0,
    ) -> None:
        self.blocks = blocks
        self.block_names = block_names
        self.width = width
        self.region_dim = region_dim
        self.expert_hidden = expert_hidden
        self.n_shared = n_shared
        self.n_task_experts = n_task_experts
        self.threshold = threshold
        self.top_k = top_k
        self.noise = noise
        self.balance_weight = balance_weight
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.ridge_skip = ridge_skip
        self.inner_folds = inner_folds
        self.random_state = random_state

    def fit(self, X: Any, Y: Any, groups: np.ndarray | None = None) -> UrbanMoE:
        X, Y = check_xy(X, Y, multi=True)
        blocks = tuple(int(b) for b in self.blocks) if self.blocks else (X.shape[1],)
        if sum(blocks) != X.shape[1] or min(blocks) < 1:
            raise ValueError(f"blocks {blocks} do not add up to the {X.shape[1]} columns of X")
        if self.n_shared < 0 or self.n_task_experts < 0 or self.n_shared + self.n_task_experts < 1:
            raise ValueError("need at least one expert per task (n_shared + n_task_experts >= 1)")
        if not 0 <= self.threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        self.blocks_ = blocks
        self.n_tasks_ = Y.shape[1]
        self.x_scaler_, self.y_scaler_ = Scaler(X), Scaler(Y)
        settings = TrainSettings(max_epochs=self.max_epochs, lr=self.lr, weight_decay=self.weight_decay,
                                 patience=self.patience, batch_size=self.batch_size,
                                 inner_folds=inner_folds(len(X), self.inner_folds))
        self.module_, self.epochs_, self.cv_error_ = fit_module(
            lambda x, t: _MoE(blocks, self.n_tasks_, self.width, self.region_dim, self.expert_hidden,
                              self.n_shared, self.n_task_experts, self.threshold, self.top_k, self.noise,
                              self.balance_weight, self.dropout, RidgeSkip(x, t) if self.ridge_skip else None),
            self.x_scaler_.forward(X), self.y_scaler_.forward(Y), settings, self.random_state, groups,
        )
        return self

    def predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self)  # sklearn's NotFittedError (one line), not an AttributeError
        X = np.asarray(X, dtype=float)
        with torch.no_grad():
            z, _ = self.module_(torch.as_tensor(self.x_scaler_.forward(X), dtype=torch.float32))
        return self.y_scaler_.clip(self.y_scaler_.inverse(z.numpy().astype(float)))

    def expert_utilisation(self, X: Any, task_names: list[str] | None = None, weights: bool = False) -> pd.DataFrame:
        """Fraction of regions routed to each expert (non-zero gate weight, no noise), per task.

        Args:
            weights: Report each expert's mean gate weight over the regions instead (after the threshold and
                renormalisation; a row sums to 1), which shows how the gate splits the work even when every
                expert stays above the threshold.

        Returns:
            One row per task, one column per expert (``shared0..``, ``<task>0..``); NaN where an expert is
            not a candidate of that task's gate. Also ``mean_active``: experts used per region.
        """
        X = np.asarray(X, dtype=float)
        names = task_names or [f"task{t}" for t in range(self.n_tasks_)]
        module: Any = self.module_
        module.eval()
        columns = [f"shared{i}" for i in range(self.n_shared)]
        columns += [f"{names[t]}{i}" for t in range(self.n_tasks_) for i in range(self.n_task_experts)]
        table = pd.DataFrame(np.nan, index=pd.Index(names, name="task"), columns=columns)
        active = []
        with torch.no_grad():
            h = module.region_embedding(torch.as_tensor(self.x_scaler_.forward(X), dtype=torch.float32))
            for t in range(self.n_tasks_):
                gate, _ = module.route(h, t)
                used = (gate > 0).float()
                shown = gate if weights else used
                for j, expert in enumerate(module.candidates(t)):
                    table.iloc[t, expert] = float(shown[:, j].mean())
                active.append(float(used.sum(dim=1).mean()))
        table["mean_active"] = active
        return table

    def chosen(self) -> dict[str, Any]:
        return {"epochs": self.epochs_}
