"""Neural heads (torch): a single-task MLP, a dense multi-task MLP, and the training loop they share.

Every neural head is trained inside one outer fold on that fold's training regions only. The number of
epochs is chosen on an inner split of those regions (a validation part held out, early stopping on its
loss); the head is then refit on all training regions for the chosen number of epochs. Nothing here sees
the outer test fold. Targets are standardised with training statistics; multi-task targets may be NaN
(missing labels), which the masked loss skips.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn

from urbanprofile.errors import TrainingError
from urbanprofile.heads.probes import inner_splits


def check_xy(X: Any, Y: Any, multi: bool) -> tuple[np.ndarray, np.ndarray]:
    """Validate a feature matrix and one (or, ``multi``, several) targets; returns float arrays."""
    X = np.asarray(X, dtype=float)
    Y = np.asarray(Y, dtype=float)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D, got shape {X.shape}")
    if not multi and Y.ndim != 1:
        raise ValueError(f"y must be 1-D, got shape {Y.shape}")
    if multi and Y.ndim == 1:
        Y = Y[:, None]
    if len(X) != len(Y):
        raise ValueError(f"X has {len(X)} rows but y has {len(Y)}")
    if not np.isfinite(X).all():
        raise ValueError("X has NaN or infinite values")
    if not multi and not np.isfinite(Y).all():
        raise ValueError("y has NaN or infinite values")
    if multi and (np.isfinite(Y).sum(axis=0) < 2).any():
        raise ValueError("every task needs at least 2 labelled regions")
    return X, Y


def inner_folds(n: int, requested: int | None) -> int:
    """Inner folds for the epoch search: as requested, else 2 for small training sets and 1 for large ones."""
    return int(requested) if requested else (2 if n < 500 else 1)


class Scaler:
    """Column standardisation with statistics from the rows it was fit on (NaN-aware).

    ``cap`` (for targets): twice the largest training value per column; :meth:`clip` bounds predictions to
    [0, cap], as the ridge probe does (one outlying region, e.g. NYC's 1.5 M-trip self-loop, would
    otherwise make a fitted head extrapolate to absurd values).
    """

    def __init__(self, values: np.ndarray) -> None:
        self.mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0)
        self.std = np.where(std > 0, std, 1.0)
        self.cap = 2 * np.maximum(np.nanmax(values, axis=0), 1.0)

    def clip(self, values: np.ndarray) -> np.ndarray:
        return np.clip(values, 0, self.cap)

    def forward(self, values: np.ndarray) -> np.ndarray:
        return (values - self.mean) / self.std

    def inverse(self, values: np.ndarray) -> np.ndarray:
        return values * self.std + self.mean


@dataclass
class TrainSettings:
    """Optimisation settings of a neural head."""

    max_epochs: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-4
    patience: int = 30
    val_fraction: float = 0.2
    batch_size: int = 0  # 0 = full batch
    inner_folds: int = 1


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over labelled cells only, each task weighted equally."""
    per_task = ((pred - target) ** 2 * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1)
    return per_task[mask.sum(dim=0) > 0].mean()


#: A head's module maps inputs to (predictions, auxiliary loss).
Forward = Callable[[torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]


def _run(
    module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    epochs: int,
    settings: TrainSettings,
    generator: torch.Generator,
    x_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
    mask_val: torch.Tensor | None = None,
) -> list[float]:
    """Train ``module`` for ``epochs``; returns the validation loss after each epoch when given."""
    optimiser = torch.optim.AdamW(module.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    history: list[float] = []

    def validate() -> None:
        if x_val is not None and y_val is not None and mask_val is not None:
            module.eval()
            with torch.no_grad():
                pred, _ = module(x_val)
                history.append(float(masked_mse(pred, y_val, mask_val)))

    validate()  # epoch 0: the initial model (the ridge start, for heads that have one)
    n = len(x)
    batch = settings.batch_size or n
    for _ in range(epochs):
        module.train()
        order = torch.randperm(n, generator=generator) if batch < n else torch.arange(n)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            optimiser.zero_grad()
            pred, aux = module(x[idx])
            loss = masked_mse(pred, y[idx], mask[idx]) + aux
            if not torch.isfinite(loss):
                raise TrainingError(f"{type(module).__name__}: the training loss became {loss.item()}")
            loss.backward()
            optimiser.step()
        validate()
        if history and len(history) - 1 - int(np.argmin(history)) >= settings.patience:
            break  # early stopping: no improvement for `patience` epochs
    return history


def fit_module(
    build: Callable[..., nn.Module],
    X: np.ndarray,
    Y: np.ndarray,
    settings: TrainSettings,
    random_state: int | None,
    groups: np.ndarray | None = None,
) -> tuple[nn.Module, int, float]:
    """Choose the epoch count on inner splits of (X, Y), then refit on all rows for that many epochs.

    With ``settings.inner_folds`` > 1 the validation curves of that many inner folds are averaged (small
    cities: one split of a few dozen regions is too noisy to pick an epoch); each curve is padded with its
    last value when it stopped early.

    Args:
        build: Makes a fresh module, from no arguments or from the training rows (X, Y) it will be fit on.
        X: Standardised inputs (n, p).
        Y: Standardised targets (n, T), NaN where missing.
        settings: Optimisation settings.
        random_state: Seed of the split, the initialisation and the batch order.
        groups: Spatial blocks; when given the validation part is whole blocks (spatial protocol).

    Returns:
        The refit module, the chosen epoch count, and the best inner validation loss.
    """
    previous = torch.get_num_threads()
    if X.size < SMALL_INPUT:  # tiny matrices: extra threads only add synchronisation (much slower when busy)
        torch.set_num_threads(1)
    try:
        return _fit_module(build, X, Y, settings, random_state, groups)
    finally:
        torch.set_num_threads(previous)


#: Inputs with fewer cells than this are trained on one thread.
SMALL_INPUT = 2_000_000


def _fit_module(
    build: Callable[..., nn.Module],
    X: np.ndarray,
    Y: np.ndarray,
    settings: TrainSettings,
    random_state: int | None,
    groups: np.ndarray | None,
) -> tuple[nn.Module, int, float]:
    seed = 0 if random_state is None else int(random_state)
    mask = np.isfinite(Y)
    y = np.where(mask, Y, 0.0)
    n_val_splits = max(2, round(1 / settings.val_fraction))
    to = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    curves = []
    for k, (train, val) in enumerate(inner_splits(len(X), n_val_splits, groups, seed)):
        if k >= settings.inner_folds:
            break
        torch.manual_seed(seed + k)
        curves.append(_run(build_on(build, X[train], Y[train]), to(X[train]), to(y[train]), to(mask[train]),
                           settings.max_epochs, settings, torch.Generator().manual_seed(seed), to(X[val]),
                           to(y[val]), to(mask[val])))
    length = max(len(c) for c in curves)
    history = np.mean([c + [c[-1]] * (length - len(c)) for c in curves], axis=0).tolist()
    best = int(np.argmin(history))
    epochs = best
    torch.manual_seed(seed)
    module = build_on(build, X, Y)
    _run(module, to(X), to(y), to(mask), epochs, settings, torch.Generator().manual_seed(seed))
    module.eval()
    return module, epochs, float(history[best])


def build_on(build: Callable[..., nn.Module], X: np.ndarray, Y: np.ndarray) -> nn.Module:
    """Call ``build(X, Y)`` when it takes the training rows (e.g. a ridge start), else ``build()``."""
    import inspect

    if len(inspect.signature(build).parameters) == 2:
        return build(X, Y)
    return build()


def ridge_start(X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ridge weights (p, T) and intercepts (T,) per task on its labelled rows, alpha by efficient LOO CV."""
    from sklearn.linear_model import RidgeCV

    weights = np.zeros((X.shape[1], Y.shape[1]))
    bias = np.zeros(Y.shape[1])
    for t in range(Y.shape[1]):
        rows = np.isfinite(Y[:, t])
        if rows.sum() >= 3:
            ridge = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(X[rows], Y[rows, t])
            weights[:, t], bias[t] = ridge.coef_, float(ridge.intercept_)
    return weights, bias


class RidgeSkip(nn.Module):
    """A linear path initialised at the ridge solution of the training rows (the start of a neural head)."""

    def __init__(self, X: np.ndarray, Y: np.ndarray) -> None:
        super().__init__()
        weights, bias = ridge_start(X, Y)
        self.linear = nn.Linear(X.shape[1], Y.shape[1])
        with torch.no_grad():
            self.linear.weight.copy_(torch.as_tensor(weights.T, dtype=torch.float32))
            self.linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class _MLP(nn.Module):
    def __init__(self, n_in: int, hidden: int, n_out: int, dropout: float, skip: RidgeSkip | None) -> None:
        super().__init__()
        last = nn.Linear(hidden, n_out)
        self.net = nn.Sequential(
            nn.Linear(n_in, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout), last,
        )
        self.skip = skip
        if skip is not None:  # start exactly at the ridge solution
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x)
        return (out + self.skip(x) if self.skip is not None else out), x.new_zeros(())


class MLPHead(BaseEstimator, RegressorMixin):
    """A two-hidden-layer MLP; one output per task (``multitask=True``: all tasks jointly, masked loss).

    Args:
        hidden: Width of the hidden layers.
        dropout: Dropout after each hidden layer.
        multitask: Fit a target matrix (n, T) with NaN for missing labels instead of one target.
        max_epochs: Upper bound of the epoch search on the inner split.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        val_fraction: Share of training regions held out to choose the epoch count.
        patience: Early stopping: epochs without a better validation loss before the search stops.
        ridge_skip: Add a linear path that starts at the ridge solution of the training rows (the MLP's
            output layer starts at zero, so epoch 0 is the ridge fit and the epoch search may keep it).
        inner_folds: Inner folds whose validation curves are averaged to choose the epoch count
            (``None``: 2 below 500 training regions, else 1).
        random_state: Seed.
    """

    def __init__(
        self,
        hidden: int = 64,
        dropout: float = 0.1,
        multitask: bool = False,
        max_epochs: int = 300,
        lr: float = 3e-3,
        weight_decay: float = 1e-3,
        val_fraction: float = 0.2,
        patience: int = 30,
        ridge_skip: bool = True,
        inner_folds: int | None = None,
        random_state: int | None = 0,
    ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.multitask = multitask
        self.max_epochs = max_epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.val_fraction = val_fraction
        self.patience = patience
        self.ridge_skip = ridge_skip
        self.inner_folds = inner_folds
        self.random_state = random_state

    def fit(self, X: Any, y: Any, groups: np.ndarray | None = None) -> MLPHead:
        X, Y = check_xy(X, y, self.multitask)
        if Y.ndim == 1:
            Y = Y[:, None]
        if self.hidden < 1 or not 0 <= self.dropout < 1:
            raise ValueError(f"hidden must be >= 1 and dropout in [0, 1), got {self.hidden}, {self.dropout}")
        self.x_scaler_, self.y_scaler_ = Scaler(X), Scaler(Y)
        settings = TrainSettings(max_epochs=self.max_epochs, lr=self.lr, weight_decay=self.weight_decay,
                                 val_fraction=self.val_fraction, patience=self.patience,
                                 inner_folds=inner_folds(len(X), self.inner_folds))
        n_in, n_out = X.shape[1], Y.shape[1]
        self.module_, self.epochs_, self.cv_error_ = fit_module(
            lambda x, t: _MLP(n_in, self.hidden, n_out, self.dropout, RidgeSkip(x, t) if self.ridge_skip else None),
            self.x_scaler_.forward(X), self.y_scaler_.forward(Y), settings, self.random_state, groups,
        )
        return self

    def predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self)  # sklearn's NotFittedError (one line), not an AttributeError
        X = np.asarray(X, dtype=float)
        with torch.no_grad():
            z, _ = self.module_(torch.as_tensor(self.x_scaler_.forward(X), dtype=torch.float32))
        pred = self.y_scaler_.clip(self.y_scaler_.inverse(z.numpy().astype(float)))  # labels are >= 0
        return pred if self.multitask else pred[:, 0]

    def chosen(self) -> dict[str, Any]:
        return {"epochs": self.epochs_}
