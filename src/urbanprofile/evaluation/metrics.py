"""Regression metrics on pooled out-of-fold predictions."""

from __future__ import annotations

import numpy as np


def mae(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(np.abs(y - pred)))


def rmse(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.sqrt(np.mean((y - pred) ** 2)))


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination; NaN when the labels are constant."""
    total = float(np.sum((y - y.mean()) ** 2))
    if total == 0:
        return float("nan")
    return 1.0 - float(np.sum((y - pred) ** 2)) / total


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    return {"mae": mae(y, pred), "rmse": rmse(y, pred), "r2": r2(y, pred)}
