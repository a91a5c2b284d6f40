"""Worked example: a new head in one module plus one registration (see docs/extending.md).

`LassoHead` is a sparse linear probe: log1p-standardised features, a Lasso whose alpha is chosen by
inner cross-validation on the training regions it is given (grouped by spatial block when the protocol
passes groups). Under a fixed-probe protocol (`paper`) it keeps one fixed alpha, as the peers' probe does.
The protocols, the runner, the store and the CLI (`--head lasso`) pick it up from the registration.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import Lasso
from sklearn.model_selection import GroupKFold, KFold

from urbanprofile.data import make_synthetic_city
from urbanprofile.evaluation import evaluate_embedding
from urbanprofile.heads.registry import HeadContext, HeadKind, HeadSpec, register_head
from urbanprofile.methods import get_method

ALPHAS = (0.001, 0.01, 0.1, 1.0)


class LassoHead:
    """A Lasso probe on log1p-standardised features; alpha by inner CV (or fixed)."""

    def __init__(self, alphas: tuple[float, ...] = ALPHAS, random_state: int | None = 0) -> None:
        self.alphas = alphas
        self.random_state = random_state

    def _features(self, X: np.ndarray) -> np.ndarray:
        return (np.log1p(np.clip(X, 0, None)) - self.mean_) / self.scale_

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> LassoHead:
        logged = np.log1p(np.clip(X, 0, None))
        self.mean_ = logged.mean(axis=0)
        self.scale_ = np.where(logged.std(axis=0) > 0, logged.std(axis=0), 1.0)
        Z = self._features(X)
        self.cv_error_ = float("nan")
        self.alpha_ = self.alphas[0]
        if len(self.alphas) > 1:
            # Inner folds of the training regions only: the outer test regions are never seen here.
            if groups is not None:
                splits = list(GroupKFold(n_splits=min(5, len(np.unique(groups)))).split(Z, y, groups))
            else:
                splits = list(KFold(n_splits=5, shuffle=True, random_state=self.random_state).split(Z))
            errors = [np.mean([np.mean((Lasso(alpha=a, max_iter=5000).fit(Z[tr], y[tr]).predict(Z[te]) - y[te]) ** 2)
                               for tr, te in splits]) for a in self.alphas]
            self.alpha_ = self.alphas[int(np.argmin(errors))]
            self.cv_error_ = float(min(errors))
        self.model_ = Lasso(alpha=self.alpha_, max_iter=5000).fit(Z, y)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.model_.predict(self._features(X)), dtype=float)

    def chosen(self) -> dict[str, Any]:
        return {"alpha": self.alpha_, "nonzero": int(np.count_nonzero(self.model_.coef_))}


def build(spec: HeadSpec, ctx: HeadContext) -> LassoHead:
    """The estimator for one fold; the protocol's probe policy decides fixed or tuned alpha."""
    return LassoHead(alphas=(1.0,) if ctx.fixed_probe else ALPHAS, random_state=ctx.random_state)


def register() -> HeadKind:
    """The one registration: after it, every protocol, the runner and `--head lasso` know the head."""
    return register_head(HeadKind("lasso", build, modules=(__name__,), names=("lasso",), probe=True), replace=True)


if __name__ == "__main__":
    register()
    city = make_synthetic_city(n_regions=60, random_state=0)
    embedding = get_method("raw-poi").build(random_state=0).fit_transform(city)
    task = city.tasks[0]
    result = evaluate_embedding(city, embedding, task=task, protocol="nested", head="lasso")
    print(f"raw-poi + lasso on {city.name}, {task}, nested: R² {result.metrics['r2']:.3f}")
