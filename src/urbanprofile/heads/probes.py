"""Probes that turn embeddings into predictions, choosing their settings by inner cross-validation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.model_selection import GroupKFold, KFold
from sklearn.neighbors import NearestNeighbors
from sklearn.utils.validation import check_is_fitted

from urbanprofile.errors import MethodUnavailableError

DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-3, 5, 17))
DEFAULT_KS = (1, 2, 3, 5, 8, 12, 20, 30, 50)
#: Above this many training regions a probe's inner CV chooses its settings on a seeded sample of this many
#: (then the chosen probe is fit on every training region): a country of H3 cells is probed in linear time.
INNER_CV_MAX_ROWS = 100_000


def inner_cv_sample(n: int, max_rows: int | None, random_state: int | None) -> np.ndarray | None:
    """Sorted row positions of the inner CV's seeded sample, or ``None`` when all ``n`` rows are used."""
    if max_rows is None or n <= max_rows:
        return None
    seed = 0 if random_state is None else int(random_state)
    return np.sort(np.random.default_rng([seed, n]).choice(n, max_rows, replace=False))


def inner_splits(
    n: int, cv: int, groups: np.ndarray | None, random_state: int | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Inner folds over the training regions: grouped (spatial) when groups are given, else shuffled."""
    if groups is not None and len(np.unique(groups)) >= 2:
        n_splits = min(cv, len(np.unique(groups)))
        yield from GroupKFold(n_splits=n_splits).split(np.zeros(n), groups=groups)
    else:
        yield from KFold(n_splits=min(cv, n), shuffle=True, random_state=random_state).split(np.zeros(n))


def _standardize(train: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (train - mean) / std, (other - mean) / std


def _ridge_solutions(
    x_train: np.ndarray, y_train: np.ndarray, alphas: np.ndarray,
    svd: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Ridge weights for many alphas from one SVD of the centred ``x_train``: (coefs (n_alphas, n_features),
    x_mean, y_mean)."""
    x_mean = x_train.mean(axis=0)
    y_mean = float(y_train.mean())
    u, s, vt = svd if svd is not None else np.linalg.svd(x_train - x_mean, full_matrices=False)
    projected = u.T @ (y_train - y_mean)
    shrink = s[None, :] / (s[None, :] ** 2 + alphas[:, None])  # (n_alphas, rank)
    return (shrink * projected[None, :]) @ vt, x_mean, y_mean


def ridge_path(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_eval: np.ndarray,
    alphas: np.ndarray,
    svd: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Ridge predictions (with intercept) for many alphas from one SVD: shape (n_eval, n_alphas).

    Args:
        svd: ``np.linalg.svd`` of the centred ``x_train`` when already known (it does not depend on y).
    """
    coefs, x_mean, y_mean = _ridge_solutions(x_train, y_train, alphas, svd)
    return (x_eval - x_mean) @ coefs.T + y_mean


def ridge_coefficients(x_train: np.ndarray, y_train: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Ridge weights and intercept of one alpha, the same solution :func:`ridge_path` predicts with.

    ``x @ coef + intercept`` equals ``ridge_path(x_train, y_train, x, [alpha])[:, 0]`` (up to rounding).
    """
    coefs, x_mean, y_mean = _ridge_solutions(x_train, y_train, np.array([alpha], dtype=float))
    return coefs[0], y_mean - float(x_mean @ coefs[0])


class TargetTransform:
    """The optional log1p target transform; predictions are capped at twice the largest training label.

    Without a cap one outlying region (NYC's 1.5 M-trip self-loop) makes a linear fit extrapolate to
    absurd values; the cap comes from training labels only.
    """

    def __init__(self, log: bool, y_train: np.ndarray, capped: bool = True) -> None:
        self.log = log
        self.cap = 2 * max(float(y_train.max()), 1.0) if capped else np.inf

    def forward(self, y: np.ndarray) -> np.ndarray:
        return np.log1p(np.clip(y, 0, None)) if self.log else y

    def inverse(self, z: np.ndarray) -> np.ndarray:
        if self.log:
            return np.expm1(np.clip(z, None, np.log1p(self.cap)))
        return np.clip(z, None, self.cap)


def _features(
    x_train: np.ndarray, x_other: np.ndarray, log: bool, scale: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the feature options, with statistics from the training rows only."""
    if log:
        x_train, x_other = np.log1p(x_train), np.log1p(np.clip(x_other, 0, None))
    if scale:
        x_train, x_other = _standardize(x_train, x_other)
    return x_train, x_other


class RidgeProbe(BaseEstimator, RegressorMixin):
    """Ridge regression whose alpha, feature transform and target transform are chosen by inner CV.

    With single options (``RidgeProbe(alphas=(1.0,), log_features=(False,), scale=(False,),
    log_target=(False,))``) it is the peers' plain ``Ridge(alpha=1)``. Selection minimises the pooled
    inner-fold squared error in the original label units; predictions are clipped at 0 (the labels are
    counts or amounts) and, when any option is selected, capped at twice the largest training label.

    Args:
        alphas: Regularisation strengths to choose from.
        log_features: log1p feature options (only tried when every training feature is >= 0, i.e. counts).
        scale: Standardisation options (fit on the training rows only).
        log_target: Target options (``True`` fits on log1p(y)).
        cv: Inner folds.
        random_state: Seed of the inner fold shuffle (and of the inner CV's sample).
        inner_max_rows: Above this many training rows the settings are chosen by inner CV on a seeded sample of
            this many rows (groups kept with their rows); the chosen probe is still fit on every row.
            ``None``: always every row.
    """

    def __init__(
        self,
        alphas: tuple[float, ...] = DEFAULT_ALPHAS,
        log_features: tuple[bool, ...] = (False, True),
        scale: tuple[bool, ...] = (True, False),
        log_target: tuple[bool, ...] = (False, True),
        cv: int = 5,
        random_state: int | None = 0,
        inner_max_rows: int | None = INNER_CV_MAX_ROWS,
    ) -> None:
        self.alphas = alphas
        self.log_features = log_features
        self.scale = scale
        self.log_target = log_target
        self.cv = cv
        self.random_state = random_state
        self.inner_max_rows = inner_max_rows

    def _feature_options(self, X: np.ndarray) -> list[Any]:
        """The feature transforms to choose among: (log1p, standardise) pairs; log1p only for counts."""
        counts = bool((X >= 0).all())
        options = [(lf, sc) for lf in self.log_features if counts or not lf for sc in self.scale]
        if not options:
            raise ValueError("log_features=(True,) needs non-negative features")
        return options

    def _apply(self, x_train: np.ndarray, x_other: np.ndarray, option: Any) -> tuple[np.ndarray, np.ndarray]:
        """One feature option, with statistics from the training rows only."""
        log, scale = option
        return _features(x_train, x_other, log, scale)

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> RidgeProbe:
        X = np.asarray(X, dtype=float)
        y = np.asarray(y, dtype=float)
        if X.ndim != 2 or len(X) != len(y):
            raise ValueError(f"X must be 2-D with one row per label, got {X.shape} and {y.shape}")
        if not np.isfinite(X).all():
            raise ValueError("embedding has NaN or infinite values")
        alphas = np.asarray(self.alphas, dtype=float)
        feature_options = self._feature_options(X)
        n_options = len(feature_options) * len(self.log_target)
        self.cv_error_ = float("nan")
        if n_options == 1 and len(alphas) == 1:
            best = (feature_options[0], self.log_target[0], float(alphas[0]))
        else:
            options = [(fo, lt) for fo in feature_options for lt in self.log_target]
            errors = np.zeros((len(options), len(alphas)))
            sample = inner_cv_sample(len(y), self.inner_max_rows, self.random_state)
            xs, ys = (X, y) if sample is None else (X[sample], y[sample])
            gs = groups if sample is None or groups is None else np.asarray(groups)[sample]
            for train, val in inner_splits(len(ys), self.cv, gs, self.random_state):
                for f, fo in enumerate(feature_options):
                    x_tr, x_va = self._apply(xs[train], xs[val], fo)
                    svd = np.linalg.svd(x_tr - x_tr.mean(axis=0), full_matrices=False)
                    for t, lt in enumerate(self.log_target):
                        target = TargetTransform(lt, ys[train])
                        z = ridge_path(x_tr, target.forward(ys[train]), x_va, alphas, svd)
                        pred = np.clip(target.inverse(z), 0, None)
                        errors[f * len(self.log_target) + t] += ((pred - ys[val, None]) ** 2).sum(axis=0)
            o, a = np.unravel_index(int(np.argmin(errors)), errors.shape)
            best = (*options[o], float(alphas[a]))
            self.cv_error_ = float(errors[o, a]) / len(ys)
        self.feature_option_, self.log_target_, self.alpha_ = best
        self._set_chosen_features(self.feature_option_)
        self.capped_ = not (n_options == 1 and len(alphas) == 1)
        self.X_train_, self.y_train_ = X, y
        return self

    def _set_chosen_features(self, option: Any) -> None:
        self.log_features_, self.scale_ = option

    def predict(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)  # sklearn's NotFittedError (one line), not an AttributeError
        X = np.asarray(X, dtype=float)
        x_tr, x_ev = self._apply(self.X_train_, X, self.feature_option_)
        target = TargetTransform(self.log_target_, self.y_train_, capped=self.capped_)
        z = ridge_path(x_tr, target.forward(self.y_train_), x_ev, np.array([self.alpha_]))[:, 0]
        return np.clip(target.inverse(z), 0, None)

    def chosen(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha_,
            "log_features": bool(self.log_features_),
            "scale": bool(self.scale_),
            "log_target": bool(self.log_target_),
        }


class KNNProbe(BaseEstimator, RegressorMixin):
    """k-nearest-neighbour regression whose k and weighting are chosen by inner CV.

    Args:
        ks: Neighbour counts to choose from.
        weights: ``"uniform"`` and/or ``"distance"``.
        cv: Inner folds.
        random_state: Seed of the inner fold shuffle.
    """

    def __init__(
        self,
        ks: tuple[int, ...] = DEFAULT_KS,
        weights: tuple[str, ...] = ("uniform", "distance"),
        cv: int = 5,
        random_state: int | None = 0,
    ) -> None:
        self.ks = ks
        self.weights = weights
        self.cv = cv
        self.random_state = random_state

    @staticmethod
    def _predict_all(
        x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, ks: np.ndarray, weighting: str
    ) -> np.ndarray:
        k_max = int(min(ks.max(), len(x_train)))
        dist, idx = NearestNeighbors(n_neighbors=k_max).fit(x_train).kneighbors(x_eval)
        w = 1.0 / np.maximum(dist, 1e-9) if weighting == "distance" else np.ones_like(dist)
        num = np.cumsum(w * y_train[idx], axis=1)
        den = np.cumsum(w, axis=1)
        cols = np.minimum(ks, k_max) - 1
        return num[:, cols] / den[:, cols]  # (n_eval, n_ks)

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> KNNProbe:
        X = np.asarray(X, dtype=float)
        y = np.asarray(y, dtype=float)
        if X.ndim != 2 or len(X) != len(y):
            raise ValueError(f"X must be 2-D with one row per label, got {X.shape} and {y.shape}")
        if not np.isfinite(X).all():  # the same one-line error as the ridge probe, not scikit-learn's paragraph
            raise ValueError("embedding has NaN or infinite values")
        bad = [w for w in self.weights if w not in ("uniform", "distance")]
        if bad or not self.weights:
            raise ValueError(f"weights must be 'uniform' and/or 'distance', got {self.weights}")
        ks = np.asarray(self.ks, dtype=int)
        if (ks < 1).any():
            raise ValueError(f"ks must be >= 1, got {self.ks}")
        self.cv_error_ = float("nan")
        if len(ks) == 1 and len(self.weights) == 1:
            self.k_, self.weighting_ = int(ks[0]), self.weights[0]
        else:
            errors = np.zeros((len(self.weights), len(ks)))
            for train, val in inner_splits(len(y), self.cv, groups, self.random_state):
                for w, weighting in enumerate(self.weights):
                    pred = self._predict_all(X[train], y[train], X[val], ks, weighting)
                    errors[w] += ((pred - y[val, None]) ** 2).sum(axis=0)
            best_w, best_k = np.unravel_index(int(np.argmin(errors)), errors.shape)
            self.k_, self.weighting_ = int(ks[best_k]), self.weights[best_w]
            self.cv_error_ = float(errors[best_w, best_k]) / len(y)
        self.X_train_, self.y_train_ = X, y
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)  # sklearn's NotFittedError (one line), not an AttributeError
        X = np.asarray(X, dtype=float)
        ks = np.array([self.k_])
        return self._predict_all(self.X_train_, self.y_train_, X, ks, self.weighting_)[:, 0]

    def chosen(self) -> dict[str, Any]:
        return {"k": self.k_, "weights": self.weighting_}


#: Weight of the learned block against the raw block (after each column is standardised) that
#: :class:`BlockRidgeProbe` chooses among; ``inf`` keeps the learned block only (raw weight 0).
BLOCK_WEIGHTS = (0.0, 0.5, 2.0, float("inf"))


class BlockRidgeProbe(RidgeProbe):
    """Ridge on a learned embedding beside raw count features, the blocks' relative scale chosen by inner CV.

    The columns are two consecutive blocks: ``n_learned`` learned columns, then raw counts. Each column is
    standardised on the training rows (the raw block optionally after log1p, chosen), then the learned
    block is multiplied by a weight w from ``block_weights``: w = 0 is the raw features alone, ``inf``
    the learned embedding alone, and in between a Ridge whose penalty on the learned block is alpha / w².
    w, alpha, the raw log1p and the log1p target are chosen together by inner CV on the training rows.

    Args:
        n_learned: Width of the learned block (the first columns).
        block_weights: Learned-block weights to choose from.
        alphas: Regularisation strengths to choose from.
        log_features: log1p options for the raw block.
        log_target: Target options.
        cv: Inner folds.
        random_state: Seed of the inner fold shuffle.
    """

    def __init__(
        self,
        n_learned: int = 0,
        block_weights: tuple[float, ...] = BLOCK_WEIGHTS,
        alphas: tuple[float, ...] = DEFAULT_ALPHAS,
        log_features: tuple[bool, ...] = (False, True),
        log_target: tuple[bool, ...] = (False, True),
        cv: int = 5,
        random_state: int | None = 0,
    ) -> None:
        super().__init__(alphas=alphas, log_features=log_features, scale=(True,), log_target=log_target, cv=cv,
                         random_state=random_state)
        self.n_learned = n_learned
        self.block_weights = block_weights

    def _feature_options(self, X: np.ndarray) -> list[Any]:
        """(raw log1p, learned weight) pairs; log1p only when the raw block holds counts."""
        if not 0 < self.n_learned < X.shape[1]:
            raise ValueError(f"n_learned must leave both blocks non-empty, got {self.n_learned} of {X.shape[1]}")
        if not self.block_weights or min(self.block_weights) < 0:
            raise ValueError(f"block_weights must be non-negative, got {self.block_weights}")
        counts = bool((X[:, self.n_learned:] >= 0).all())
        logs = [lf for lf in self.log_features if counts or not lf] or [False]
        return [(lf, float(w)) for lf in logs for w in self.block_weights]

    def _apply(self, x_train: np.ndarray, x_other: np.ndarray, option: Any) -> tuple[np.ndarray, np.ndarray]:
        raw_log, weight = option
        k = self.n_learned
        learned_tr, learned_ot = _standardize(x_train[:, :k], x_other[:, :k])
        if np.isinf(weight):
            return learned_tr, learned_ot
        raw_tr, raw_ot = _features(x_train[:, k:], x_other[:, k:], raw_log, True)
        return np.hstack([weight * learned_tr, raw_tr]), np.hstack([weight * learned_ot, raw_ot])

    def _set_chosen_features(self, option: Any) -> None:
        self.raw_log_, self.block_weight_ = option
        self.log_features_, self.scale_ = self.raw_log_, True

    def chosen(self) -> dict[str, Any]:
        return {"alpha": self.alpha_, "log_features": bool(self.raw_log_), "scale": True,
                "log_target": bool(self.log_target_), "block_weight": float(self.block_weight_)}


#: Head kinds a method can ask for (``ridge-blocks``: :class:`BlockRidgeProbe` on a learned + raw embedding).
HEADS = ("ridge", "knn", "ridge-blocks")


def blocks_paper_reason(head: str) -> str:
    """Why a learned + raw head (``ridge-blocks``) has no ``paper`` probe.

    ``paper`` is the peers' fixed Ridge(alpha=1) on an embedding as it is. For a learned embedding beside
    raw counts no peer reported such a probe, and that Ridge on the unscaled concatenation is the raw
    counts' least-squares fit (the counts are hundreds of times larger than the learned columns, so alpha=1
    barely penalises them and the learned block is drowned): it only repeats ``raw-all`` under ``paper``.
    """
    return (f"head {head!r} has no `paper` probe (the peers' fixed Ridge on unscaled learned + raw "
            "columns is the raw counts' least squares); use nested or spatial")


def make_probe(head: str, fixed: bool, random_state: int | None = 0, n_learned: int = 0) -> RidgeProbe | KNNProbe:
    """The probe for a head kind under a probe policy: the peers' fixed settings (``fixed``), else selected.

    ``n_learned`` is the width of the learned block of a ``ridge-blocks`` embedding; that head has no fixed
    probe (see :func:`blocks_paper_reason`).

    Raises:
        MethodUnavailableError: ``ridge-blocks`` with ``fixed``.
        TypeError: ``fixed`` is not a bool (a protocol name would read as true: ask the protocol instead,
            ``get_protocol(name).fixed_probe``).
    """
    if not isinstance(fixed, bool | np.bool_):
        raise TypeError(f"make_probe takes the probe policy fixed: bool, not {fixed!r} (a protocol name?)")
    if head == "ridge-blocks":
        if fixed:
            raise MethodUnavailableError(blocks_paper_reason(head))
        return BlockRidgeProbe(n_learned=n_learned, random_state=random_state)
    if head == "ridge":
        if fixed:
            return RidgeProbe(alphas=(1.0,), log_features=(False,), scale=(False,), log_target=(False,))
        return RidgeProbe(random_state=random_state)
    if head == "knn":
        if fixed:
            return KNNProbe(ks=(5,), weights=("uniform",))
        return KNNProbe(random_state=random_state)
    raise ValueError(f"unknown head {head!r}; valid: {', '.join(HEADS)}")
