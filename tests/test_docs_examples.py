"""The worked examples of the documentation run, so the pages cannot drift from the code."""

from __future__ import annotations

import sys

import pandas as pd
import pytest
from helpers import load_example

from urbanprofile.data import make_synthetic_city
from urbanprofile.errors import MethodUnavailableError
from urbanprofile.evaluation import evaluate_embedding
from urbanprofile.methods import _REGISTRY, get_method, list_methods


@pytest.fixture
def poi_share():
    module = load_example("poi_share_embedder")
    module.register()
    yield module
    _REGISTRY.pop("poi-share", None)
    sys.modules.pop(module.__name__, None)


def test_new_embedder_is_one_module_and_one_registration(poi_share) -> None:
    assert "poi-share" in list_methods()
    city = make_synthetic_city(n_regions=40, random_state=0)
    embedding = get_method("poi-share").build(random_state=0).fit_transform(city)
    assert isinstance(embedding, pd.DataFrame)
    assert embedding.index.equals(city.regions.index)
    shares = embedding.to_numpy()
    assert ((shares >= 0) & (shares <= 1)).all()
    nonempty = city.view("poi_counts").reindex(city.regions.index).sum(axis=1).to_numpy() > 0
    assert abs(shares[nonempty].sum(axis=1) - 1).max() < 1e-9
    result = evaluate_embedding(city, embedding, task=city.tasks[0], protocol="nested")
    assert result.metrics["r2"] == result.metrics["r2"]  # a number, not NaN


def test_new_embedder_declares_its_views(poi_share) -> None:
    city = make_synthetic_city(n_regions=40, random_state=0)
    del city.views["poi_counts"]
    with pytest.raises(MethodUnavailableError, match="poi_counts"):
        get_method("poi-share").check_available(city)


def test_registration_is_cleaned_up() -> None:
    assert "poi-share" not in list_methods()
