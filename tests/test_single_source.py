"""A method's requirements are declared in one place, its MethodSpec: embedder classes declare none, and an
embedder that reads a choice of views is built with the spec's views, whatever its own default."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import replace
from typing import Any

import pytest

from urbanprofile.data import make_synthetic_city
from urbanprofile.embedders.base import Embedder
from urbanprofile.methods import MethodSpec, get_method, list_methods

#: Constructor arguments that choose the views an embedder reads.
VIEW_ARGUMENTS = {"views", "raw_views"}


def _class_of(spec: MethodSpec) -> Any:
    module_name, _, class_name = spec.factory.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def _builtin_specs() -> list[MethodSpec]:
    return [get_method(name) for name in list_methods()]


def test_embedder_classes_declare_no_requirements() -> None:
    # A class attribute beside the spec's field is a second source that can drift (mgfn's once did).
    for spec in _builtin_specs():
        for cls in _class_of(spec).__mro__:
            if cls is object:
                continue
            assert "needs_locations" not in vars(cls), f"{spec.name}: {cls.__name__}.needs_locations"
            declared = vars(cls).get("required_views")
            assert declared is None or isinstance(declared, property), f"{spec.name}: {cls.__name__}.required_views"


def test_an_embedder_that_chooses_views_takes_them_from_its_spec() -> None:
    for spec in _builtin_specs():
        arguments = VIEW_ARGUMENTS & set(inspect.signature(_class_of(spec).__init__).parameters)
        # Its default would otherwise be a second statement of what the method reads.
        assert arguments <= {spec.views_param}, f"{spec.name}: {sorted(arguments)} but views_param={spec.views_param}"
        if spec.views_param is None:
            continue
        embedder = spec.build(random_state=0)
        assert tuple(getattr(embedder, spec.views_param)) == spec.all_views, spec.name
        assert tuple(embedder.required_views) == spec.all_views, spec.name  # type: ignore[attr-defined]


def test_the_spec_wins_over_the_embedders_default() -> None:
    pca = get_method("pca")
    default = inspect.signature(_class_of(pca).__init__).parameters["views"].default
    narrowed = replace(pca, views=("poi_counts",))
    assert default != narrowed.all_views  # the case where the two could disagree
    embedder = narrowed.build(random_state=0)
    assert embedder.required_views == ("poi_counts",)  # type: ignore[attr-defined]
    city = make_synthetic_city(n_regions=40, random_state=0)
    assert embedder.fit_transform(city).shape[1] <= city.view("poi_counts").shape[1]


def test_views_on_a_city_lacking_one_come_from_the_spec_too() -> None:
    city = make_synthetic_city(n_regions=40, random_state=0)
    del city.views["landuse_counts"]
    for name in ("pca", "hafusion", "hafusion+raw"):
        spec = get_method(name).for_city(city)
        assert "landuse_counts" not in spec.all_views
        assert tuple(spec.build(random_state=0).required_views) == spec.all_views, name  # type: ignore[attr-defined]


def test_views_stated_twice_differently_are_refused() -> None:
    with pytest.raises(ValueError, match="declare them once"):
        MethodSpec("twice", "urbanprofile.embedders.baselines.raw:RawViews", {"views": ("poi_counts",)},
                   requires_views=("od_flows",), views_param="views")


def test_the_base_class_holds_no_requirement() -> None:
    assert not hasattr(Embedder, "required_views") and not hasattr(Embedder, "needs_locations")
