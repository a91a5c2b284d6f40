"""One contract suite over every registered method and head (in the spirit of scikit-learn's estimator checks).

The parameters are read from the registries when the tests are collected, so a method registered with
``register_method`` or a head kind registered with ``register_head`` (built-in or plug-in) is checked the moment it
is registered. Methods run on a tiny synthetic city with every view it can offer, with small settings (few epochs,
narrow layers) passed as ``params`` overrides; heads run on a small random ``X, y``.

A method whose optional package or input is missing is skipped with the registry's own one-line reason
(``MethodSpec.unavailable_reason``), never by a hand list; the only hand list is :data:`HEAVY`, methods whose inputs
need frozen pretrained encoders and are exercised in their own test files.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError as SklearnNotFittedError

from urbanprofile.data import CityData, make_synthetic_city
from urbanprofile.embedders.base import Embedder
from urbanprofile.errors import MethodUnavailableError, NotFittedError
from urbanprofile.evaluation.protocols import PROTOCOL_REGISTRY, get_protocol
from urbanprofile.heads.registry import HEADS, HeadSpec, build_head, head_unavailable_reason
from urbanprofile.methods import MethodSpec, get_method, list_methods

N_REGIONS = 36
#: Small settings for any constructor argument of these names (the spec's own value is replaced too).
SMALL = {"epochs": 2, "d": 8, "d_model": 16, "n_heads": 2, "n_components": 4, "batch_size": 16}
#: Methods whose inputs need frozen pretrained encoders (MiniLM text, GeoCLIP, images): too slow for a contract run
#: on 2 cores, and exercised with their own stand-ins elsewhere.
HEAVY = {"urbanvlp": "frozen MiniLM/GeoCLIP encoders of captions and photos; "
         "covered by tests/embedders/multimodal/test_urbanvlp.py"}


def _with_patterns(city: CityData, n_patterns: int = 2) -> CityData:
    """Split the OD matrix into time patterns that add up to it, so ``od_patterns`` methods can run."""
    od = city.views["od_flows"].to_numpy()
    first = np.floor(od / 2)
    patterns = np.stack([first, od - first])[:n_patterns]
    ids = city.region_ids
    columns = pd.MultiIndex.from_product([range(n_patterns), ids], names=["pattern", "destination"])
    city.views["od_patterns"] = pd.DataFrame(patterns.transpose(1, 0, 2).reshape(len(ids), -1), index=ids,
                                             columns=columns)
    return city


def _with_captions(city: CityData) -> CityData:
    words = ["river park trees", "factory warehouse trucks", "shops cafes restaurants", "apartments housing"]
    rows = [(rid, f"The tile shows {words[i % 4]} near a road.") for i, rid in enumerate(city.region_ids)]
    city.modalities["tile_caption"] = pd.DataFrame(rows, columns=["region_id", "text"])
    return city


def _cities() -> list[CityData]:
    """The cities a method may run on, plainest first (captions would make the modality methods encode text)."""
    plain = _with_patterns(make_synthetic_city(n_regions=N_REGIONS, random_state=0)).validate()
    captioned = _with_captions(_with_patterns(make_synthetic_city(n_regions=N_REGIONS, random_state=0)))
    return [plain, captioned.validate()]


def _embedder_class(spec: MethodSpec) -> type[Embedder]:
    module_name, _, class_name = spec.factory.partition(":")
    cls: type[Embedder] = getattr(importlib.import_module(module_name), class_name)
    return cls


def _small(spec: MethodSpec) -> MethodSpec:
    """The spec with small settings for whichever of :data:`SMALL` its constructor takes."""
    accepted = inspect.signature(_embedder_class(spec).__init__).parameters
    params = {**spec.params, **{k: v for k, v in SMALL.items() if k in accepted}}
    if "learned_params" in accepted:  # a learned embedding beside raw features: shrink the learned one
        learned = spec.params.get("learned", accepted["learned"].default if "learned" in accepted else None)
        inner = inspect.signature(getattr(importlib.import_module(learned.partition(":")[0]),
                                          learned.partition(":")[2]).__init__).parameters
        params["learned_params"] = {**(spec.params.get("learned_params") or {}),
                                    **{k: v for k, v in SMALL.items() if k in inner}}
    return replace(spec, params=params)


def _runnable(name: str) -> tuple[MethodSpec, CityData]:
    """The small spec and the first city it can run on, or a skip with the registry's reason."""
    if name in HEAVY:
        pytest.skip(f"{name}: {HEAVY[name]}")
    spec = _small(get_method(name))
    reasons = []
    for city in _cities():
        reason = spec.unavailable_reason(city)
        if reason is None:
            return spec, city
        reasons.append(reason)
    pytest.skip(f"{name} cannot run on the synthetic cities: {reasons[-1]}")


def _no_targets(city: CityData) -> CityData:
    """The same city with every label hidden (NaN) and the label columns renamed."""
    hidden = pd.DataFrame(np.nan, index=city.targets.index, columns=[f"hidden_{c}" for c in city.targets.columns])
    return replace(city, targets=hidden, cache={})


METHOD_NAMES = list_methods()


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_method_contract(name: str) -> None:
    spec, city = _runnable(name)
    embedder = spec.build(random_state=0)
    params = embedder.get_params()
    # The constructor stores its arguments and nothing else (validation and fitted state belong to fit).
    assert params["random_state"] == 0 and all(params[k] == v for k, v in spec.params.items())
    assert not [k for k in vars(embedder) if k.endswith("_")], "fitted attributes set in __init__"
    with pytest.raises(NotFittedError):
        embedder.transform(city)

    embedding = embedder.fit(city).transform(city)
    assert isinstance(embedding, pd.DataFrame)
    assert embedding.index.equals(city.regions.index) and embedding.index.name == "region_id"
    assert len(embedding.columns) > 0 and embedding.columns.is_unique
    assert all(pd.api.types.is_numeric_dtype(t) for t in embedding.dtypes)
    assert np.isfinite(embedding.to_numpy(dtype=float)).all()
    assert embedder.get_params() == params, "fit changed a constructor argument"

    # A clone (same params, same seed) gives the same output; fit never reads the targets.
    again = type(embedder)(**params).fit(_no_targets(city)).transform(city)
    pd.testing.assert_frame_equal(again, embedding)
    if spec.stochastic:  # the seed is used, not ignored
        other = type(embedder)(**{**params, "random_state": 1}).fit(city).transform(city)
        assert not np.allclose(other.to_numpy(dtype=float), embedding.to_numpy(dtype=float))


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_method_missing_input_is_unavailable(name: str) -> None:
    """Dropping a view the method reads (or the locations it needs) makes the registry say so, naming it."""
    spec = get_method(name)
    # The spec declares the views and locations once: the hard requirements, and the views read when present.
    views = spec.requires_views
    optional = spec.optional_views
    if not views and not optional and not spec.needs_locations:
        pytest.skip(f"{name} declares no required view or locations")
    for view in views:
        city = _with_patterns(make_synthetic_city(n_regions=N_REGIONS, random_state=0))
        del city.views[view]
        with pytest.raises(MethodUnavailableError, match=f"'{view}'"):
            spec.check_available(city)
    if optional and not views:  # a method that reads any of its views needs at least one
        city = _with_patterns(make_synthetic_city(n_regions=N_REGIONS, random_state=0))
        for view in optional:
            city.views.pop(view, None)
        with pytest.raises(MethodUnavailableError, match="at least one"):
            spec.check_available(city)
    if spec.needs_locations:
        city = make_synthetic_city(n_regions=N_REGIONS, random_state=0)
        city.regions = city.regions.drop(columns=["lon", "lat"])
        with pytest.raises(MethodUnavailableError, match="locations"):
            spec.check_available(city)


# -- heads ---------------------------------------------------------------------------------------------

N_ROWS, N_EMB, N_PROMPT = 40, 6, 4
#: Small settings for the neural heads (epoch search and patience).
SMALL_HEAD = {"max_epochs": 3, "patience": 2}


def _representatives() -> list[str]:
    """One head name per distinct spec shape of each registered kind (multitask, alignment, attention)."""
    names = []
    for kind_name in HEADS.names():
        kind = HEADS.get(kind_name)
        seen = set()
        for name in kind.names:
            spec = kind.spec(name)
            if spec is None:
                continue
            shape = (spec.multitask, spec.align, spec.attention)
            if shape not in seen:
                seen.add(shape)
                names.append(name)
    return names


def _data(spec: HeadSpec, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative counts-like targets that depend on X (heads may log-transform them)."""
    rng = np.random.default_rng(seed)
    n_cols = N_EMB + (N_PROMPT if spec.needs_prompts else 0)
    X = rng.normal(size=(N_ROWS, n_cols))
    signal = np.exp(X[:, :3] @ np.array([0.5, -0.3, 0.2]))
    y = np.column_stack([signal, signal * 2 + 1]) if spec.multitask else signal
    return X, y


def _head(name: str, fixed: bool) -> tuple[Any, HeadSpec]:
    spec = HEADS.get(next(k for k in HEADS.names() if HEADS.get(k).spec(name) is not None)).spec(name)
    assert spec is not None
    head = build_head(spec, fixed, random_state=0, n_region_features=N_EMB, n_learned=N_EMB // 2)
    small = {k: v for k, v in SMALL_HEAD.items() if k in head.get_params()}
    return head.set_params(**small), spec


HEAD_NAMES = _representatives()
POLICIES = sorted({get_protocol(p).fixed_probe for p in PROTOCOL_REGISTRY.names()})


@pytest.mark.parametrize("fixed", POLICIES, ids=lambda f: "fixed-probe" if f else "tuned")
@pytest.mark.parametrize("name", HEAD_NAMES)
def test_head_contract(name: str, fixed: bool) -> None:
    reason = head_unavailable_reason(name, fixed)
    if reason is not None:  # the registry says so; building it must then fail with that documented error
        with pytest.raises(MethodUnavailableError):
            _head(name, fixed)
        pytest.skip(reason)
    head, spec = _head(name, fixed)
    X, y = _data(spec)
    params = head.get_params()
    with pytest.raises(SklearnNotFittedError):
        head.predict(X)
    assert head.fit(X, y) is head
    pred = head.predict(X)
    assert pred.shape == np.shape(y) and np.isfinite(pred).all()
    assert head.get_params() == params, "fit changed a constructor argument"
    # A clone with the same seed predicts the same; so does a second fit of the same object.
    np.testing.assert_array_equal(clone(head).fit(X, y).predict(X), pred)
    np.testing.assert_array_equal(head.fit(X, y).predict(X), pred)
    assert isinstance(head.chosen(), dict)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_head_rejects_nan_in_x(name: str) -> None:
    policy = POLICIES[0]
    if head_unavailable_reason(name, policy) is not None:
        policy = not policy
    head, spec = _head(name, policy)
    X, y = _data(spec)
    X[3, 1] = np.nan
    with pytest.raises(ValueError) as error:
        head.fit(X, y)
    message = str(error.value)
    assert "\n" not in message and "nan" in message.lower(), message
