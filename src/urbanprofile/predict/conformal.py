"""Conformal intervals whose calibration residuals come from out-of-fold predictions over spatial blocks.

Split conformal on in-sample residuals is far too narrow, and even random-fold residuals are too optimistic
where labels are spatially autocorrelated: a region's neighbours, in the training folds, make its error look
small. So the calibration residuals are the out-of-fold residuals of a protocol's own folds (``spatial``:
whole k-means blocks held out), from the same code that scores the method (``evaluate_embedding``), and the
intervals are normalised: each residual is divided by a difficulty estimate (the mean out-of-fold absolute
residual of the region's nearest other labelled regions in embedding space, plus an offset), so width follows
difficulty.

Why crepes rather than MAPIE: crepes' ``ConformalRegressor`` takes calibration residuals and difficulty
estimates as plain arrays, so the out-of-fold predictions stay ours (one code path with ``evaluate``); MAPIE
1.x refits clones of the estimator inside its own cross-validation loop, and its residual-normalised score is
only offered for split conformal, not for the cross-conformal (CV+) regressors.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.neighbors import NearestNeighbors

from urbanprofile.errors import UrbanProfileError, require

#: Labelled neighbours whose out-of-fold errors make a region's difficulty, and the offset added to it as a
#: fraction of the median absolute residual (no region gets a near-zero-width interval from lucky neighbours).
#: Chosen on spatial hold-out of NYC and Chicago (raw-all, raw-location, knn-location): against 10 and 0.1,
#: 25 and 0.5 gave 5-14% narrower intervals at equal or closer-to-nominal coverage (noisy difficulty estimates
#: make the normalised scores heavy-tailed, which widens every interval). A benchmark-informed choice: the
#: coverage in benchmarks/results/predict.md is measured on the same cities.
N_DIFFICULTY_NEIGHBOURS = 25
DIFFICULTY_FLOOR = 0.5


class EmbeddingSpace:
    """The space distances are measured in: log1p for count embeddings, then z-scores from the labelled rows."""

    def __init__(self, log: bool, mean: np.ndarray, scale: np.ndarray) -> None:
        self.log = log
        self.mean = mean
        self.scale = scale

    @classmethod
    def fit(cls, X: np.ndarray) -> EmbeddingSpace:
        log = bool((X >= 0).all())
        base = np.log1p(X) if log else X
        std = base.std(axis=0)
        return cls(log, base.mean(axis=0), np.where(std > 0, std, 1.0))

    def transform(self, X: np.ndarray) -> np.ndarray:
        base = np.log1p(np.clip(X, 0, None)) if self.log else X
        return np.asarray((base - self.mean) / self.scale, dtype=float)


def neighbour_mean(reference: np.ndarray, values: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Mean of ``values`` over the ``k`` nearest ``reference`` rows of each ``query`` row."""
    k = int(min(k, len(reference)))
    _, idx = NearestNeighbors(n_neighbors=k).fit(reference).kneighbors(query)
    return np.asarray(values[idx].mean(axis=1), dtype=float)


def calibration_difficulty(Z: np.ndarray, abs_residuals: np.ndarray, floor: float) -> np.ndarray:
    """Difficulty of each calibration region from its nearest *other* labelled regions (leave-one-out).

    Excluding the region's whole fold instead (its spatial block's regions) looks more careful but made the
    calibration difficulties less like a new region's (whose neighbours are every labelled region): on spatial
    hold-out of NYC and Chicago it over-covered (0.96-0.99 at 90%) with 5-10% wider intervals.
    """
    k = int(min(N_DIFFICULTY_NEIGHBOURS, len(Z) - 1))
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(Z).kneighbors(Z)
    # Drop each row's own index (the first column, unless an exact duplicate came first).
    own = np.arange(len(Z))[:, None]
    others = np.where(idx == own, -1, idx)
    values = np.where(others >= 0, abs_residuals[np.clip(others, 0, None)], np.nan)
    sigmas = np.nanmean(values, axis=1) if k > 0 else np.zeros(len(Z))
    return np.asarray(sigmas, dtype=float) + floor


def difficulty(Z_labelled: np.ndarray, abs_residuals: np.ndarray, Z_query: np.ndarray, floor: float) -> np.ndarray:
    """Difficulty of new regions from every labelled region's out-of-fold absolute residual."""
    return neighbour_mean(Z_labelled, abs_residuals, Z_query, N_DIFFICULTY_NEIGHBOURS) + floor


def difficulty_floor(abs_residuals: np.ndarray) -> float:
    median = float(np.median(abs_residuals))
    return DIFFICULTY_FLOOR * median if median > 0 else 1e-9


def check_level(level: float, n_calibration: int | None = None) -> None:
    """A level in (0, 1) that the calibration set can honour with a finite interval."""
    if not 0 < level < 1:
        raise UrbanProfileError(f"--level must be between 0 and 1 (exclusive), got {level}")
    if n_calibration is not None and math.ceil((n_calibration + 1) * level) > n_calibration:
        needed = math.ceil(level / (1 - level))
        raise UrbanProfileError(f"--level {level} needs at least {needed} calibration regions for a finite interval; "
                                f"this model has {n_calibration}")


def conformal_intervals(
    pred: np.ndarray, sigmas: np.ndarray, cal_residuals: np.ndarray, cal_sigmas: np.ndarray, level: float,
    y_min: float = -np.inf,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised conformal intervals at ``level`` (crepes), bounded below by ``y_min``."""
    check_level(level, len(cal_residuals))
    crepes = require("crepes", "predict")
    regressor = crepes.ConformalRegressor().fit(residuals=cal_residuals, sigmas=cal_sigmas)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # level vs calibration size is checked above
        bounds = regressor.predict_int(y_hat=pred, sigmas=sigmas, confidence=level, y_min=y_min)
    return bounds[:, 0].astype(float), bounds[:, 1].astype(float)


#: Interval constructions ``fit --interval`` offers.
INTERVALS = ("normalised", "cv+")


def cv_plus_intervals(
    fold_preds: np.ndarray, cal_folds: np.ndarray, cal_scores: np.ndarray, sigmas: np.ndarray, level: float,
    y_min: float = -np.inf,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised CV+ intervals (Barber, Candès, Ramdas & Tibshirani 2021, over spatial or random folds).

    Each calibration region ``i`` votes with the model of the fold that held it out: around a new region ``x``
    the interval runs from the lower ``level``-quantile of ``mu_{-k(i)}(x) - s_i * sigma(x)`` to the upper one of
    ``mu_{-k(i)}(x) + s_i * sigma(x)``, where ``s_i`` is the region's out-of-fold residual divided by its
    difficulty. Unlike the full model's prediction plus a residual quantile, the spread of the fold models at
    ``x`` widens the interval where they disagree; the guarantee is ``1 - 2 alpha`` in the worst case, and about
    ``1 - alpha`` in practice.

    Args:
        fold_preds: ``(n_folds, n_new)`` predictions of each fold's model at the new regions.
        cal_folds: Fold index (a row of ``fold_preds``) of each calibration region.
        cal_scores: Each calibration region's absolute out-of-fold residual divided by its difficulty.
        sigmas: Difficulty of each new region.
        level: Interval level in (0, 1).
        y_min: Lower bound of the label (0 for counts).
    """
    check_level(level, len(cal_scores))
    n = len(cal_scores)
    alpha = 1 - level
    k_low, k_high = math.floor(alpha * (n + 1)), math.ceil(level * (n + 1))
    centres = fold_preds[cal_folds]  # (n_cal, n_new): the held-out-fold model of each calibration region
    spread = cal_scores[:, None] * sigmas[None, :]
    lower = (np.full(centres.shape[1], -np.inf) if k_low < 1
             else np.partition(centres - spread, k_low - 1, axis=0)[k_low - 1])
    upper = np.partition(centres + spread, k_high - 1, axis=0)[k_high - 1]
    return np.maximum(lower, y_min).astype(float), upper.astype(float)


def held_out_fold_coverage(
    y: np.ndarray, oof_pred: np.ndarray, cal_sigmas: np.ndarray, folds: np.ndarray, level: float,
    y_min: float = -np.inf,
) -> dict[str, object]:
    """The coverage a user can expect, measured on the calibration regions without grading them on themselves.

    Each calibration fold in turn is left out of the calibration set; the intervals calibrated on the other
    folds' residuals are put around the left-out regions' out-of-fold predictions and scored against their labels.
    Calibrating on a region and then counting it would report at least ``level`` by construction.

    Returns:
        ``coverage`` and ``mean_width`` pooled over the regions, and ``per_fold``: one dict per fold with its
        ``fold``, ``n``, ``coverage`` and ``mean_width``.
    """
    inside = np.zeros(len(y), dtype=bool)
    width = np.zeros(len(y))
    per_fold = []
    residuals = y - oof_pred
    for k in np.unique(folds):
        out = folds == k
        lower, upper = conformal_intervals(oof_pred[out], cal_sigmas[out], residuals[~out], cal_sigmas[~out], level,
                                           y_min=y_min)
        inside[out] = (y[out] >= lower) & (y[out] <= upper)
        width[out] = upper - lower
        per_fold.append({"fold": int(k), "n": int(out.sum()), "coverage": float(inside[out].mean()),
                         "mean_width": float(width[out].mean())})
    return {"coverage": float(inside.mean()), "mean_width": float(width.mean()), "per_fold": per_fold}
