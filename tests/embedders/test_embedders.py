"""Every registered baseline: output contract, availability, and the registry."""

from __future__ import annotations

import numpy as np
import pytest

from urbanprofile.data import CityData
from urbanprofile.errors import NotFittedError, UnknownNameError
from urbanprofile.methods import MethodSpec, get_method, list_methods, register_method


@pytest.mark.parametrize("name", ["raw-poi", "raw-landuse", "raw-mobility", "raw-all", "pca", "autoencoder",
                                  "raw-location", "knn-location"])
def test_embedder_contract(city: CityData, name: str) -> None:
    embedder = get_method(name).build(random_state=0)
    with pytest.raises(NotFittedError):
        embedder.transform(city)
    embedding = embedder.fit(city).transform(city)
    assert embedding.index.equals(city.region_ids) and embedding.index.name == "region_id"
    raw = {"raw-poi": "poi_0", "raw-landuse": "landuse_0", "raw-mobility": "out_", "raw-all": "poi_0",
           "raw-location": "x_km", "knn-location": "x_km"}
    if name in raw:  # raw features keep what they are as names
        assert str(embedding.columns[0]).startswith(raw[name]) and embedding.columns.is_unique
    else:
        assert list(embedding.columns[:2]) == ["emb_0", "emb_1"]
    assert np.isfinite(embedding.to_numpy()).all()


def test_raw_mobility_is_out_and_in_flows(city: CityData) -> None:
    embedding = get_method("raw-mobility").build().fit_transform(city)
    od = city.views["od_flows"].to_numpy()
    np.testing.assert_array_equal(embedding.to_numpy(), np.hstack([od, od.T]))


def test_unavailable_reason(city: CityData) -> None:
    del city.views["poi_counts"]
    assert "needs the 'poi_counts' view" in (get_method("raw-poi").unavailable_reason(city) or "")
    assert get_method("raw-location").unavailable_reason(city) is None
    city.regions = city.regions.drop(columns=["lon", "lat"])
    assert "needs region locations" in (get_method("knn-location").unavailable_reason(city) or "")


def test_registry_accepts_new_methods() -> None:
    assert {"raw-poi", "pca", "autoencoder", "knn-location"} <= set(list_methods())
    spec = MethodSpec("test-double-poi", "urbanprofile.embedders.baselines.raw:RawViews", {"views": ("poi_counts",)})
    register_method(spec)
    assert get_method("test-double-poi") is spec
    with pytest.raises(ValueError, match="already registered"):
        register_method(spec)
    with pytest.raises(UnknownNameError, match="unknown method"):
        get_method("nope")


def test_config_hash_changes_with_params() -> None:
    a = MethodSpec("x", "m:C", {"n": 1})
    b = MethodSpec("x", "m:C", {"n": 2})
    assert a.config_hash != b.config_hash
