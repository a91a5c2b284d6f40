"""Probes: exact ridge algebra, the peers' plain Ridge, and selection that only sees training rows."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.neighbors import KNeighborsRegressor

from urbanprofile.heads import KNNProbe, RidgeProbe, make_probe
from urbanprofile.heads.probes import ridge_path


@pytest.fixture
def xy() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.poisson(5, size=(80, 6)).astype(float)
    y = X @ rng.uniform(0, 3, 6) + rng.normal(0, 1, 80) + 10
    return X, y


def test_ridge_path_matches_sklearn(xy) -> None:
    X, y = xy
    alphas = np.array([0.1, 1.0, 10.0])
    path = ridge_path(X[:60], y[:60], X[60:], alphas)
    for j, alpha in enumerate(alphas):
        np.testing.assert_allclose(path[:, j], Ridge(alpha=alpha).fit(X[:60], y[:60]).predict(X[60:]), rtol=1e-8)


def test_paper_probe_is_plain_ridge_with_clipping(xy) -> None:
    X, y = xy
    probe = make_probe("ridge", True).fit(X[:60], y[:60])
    expected = np.clip(Ridge(alpha=1.0).fit(X[:60], y[:60]).predict(X[60:]), 0, None)
    np.testing.assert_allclose(probe.predict(X[60:]), expected, rtol=1e-8)


def test_selection_picks_log_target_for_multiplicative_labels() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(150, 3))
    y = np.expm1(2 + X @ np.array([1.0, -0.5, 0.3]) + rng.normal(0, 0.1, 150))
    probe = RidgeProbe(random_state=0).fit(X, y)
    assert probe.chosen()["log_target"] is True


def test_selection_ignores_rows_it_was_not_given(xy) -> None:
    # Same training rows, wildly different "test" labels: the fitted probe must not change.
    X, y = xy
    a = RidgeProbe(random_state=0).fit(X[:60], y[:60])
    y2 = y.copy()
    y2[60:] = 1e6
    b = RidgeProbe(random_state=0).fit(X[:60], y2[:60])
    assert a.chosen() == b.chosen()
    np.testing.assert_array_equal(a.predict(X[60:]), b.predict(X[60:]))


def test_knn_probe_matches_sklearn_and_selects_k() -> None:
    rng = np.random.default_rng(2)
    X = rng.uniform(0, 10, size=(200, 2))
    y = np.sin(X[:, 0]) + np.cos(X[:, 1]) + 3
    fixed = KNNProbe(ks=(5,), weights=("uniform",)).fit(X[:150], y[:150])
    expected = KNeighborsRegressor(5).fit(X[:150], y[:150]).predict(X[150:])
    np.testing.assert_allclose(fixed.predict(X[150:]), expected)
    chosen = KNNProbe(random_state=0).fit(X[:150], y[:150]).chosen()
    assert 1 <= chosen["k"] <= 12


def test_bad_probe_arguments() -> None:
    with pytest.raises(ValueError, match="weights"):
        KNNProbe(weights=("gaussian",)).fit(np.zeros((10, 2)), np.zeros(10))
    with pytest.raises(ValueError, match="unknown head"):
        make_probe("forest", False)
    with pytest.raises(TypeError, match="not 'nested'"):  # a protocol name would silently read as true
        make_probe("ridge", "nested")
