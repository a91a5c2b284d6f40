"""Methods on the views a city has: a city without land use (or trips) runs what its views allow, says which views
each method read, and names the missing view when a method cannot run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from urbanprofile.benchmark.runner import BenchmarkPlan, run_benchmark
from urbanprofile.data import CityData, make_synthetic_city
from urbanprofile.errors import MethodUnavailableError
from urbanprofile.methods import MethodSpec, get_method, list_methods

#: Short trainings: these tests check what is read, not what is learned.
FAST = {
    "autoencoder": {"epochs": 5},
    "mvure": {"epochs": 3, "d": 16, "k_neighbors": 5},
    "hafusion": {"epochs": 3, "d": 16, "feedforward": 32},
    "srel": {"epochs": 3, "d": 16},
}


def without(city: CityData, *views: str) -> CityData:
    for view in views:
        city.views.pop(view, None)
    return city.validate()


@pytest.fixture
def no_landuse() -> CityData:
    """An own city with POIs and trips but no land use (nor its similarity)."""
    city = make_synthetic_city(n_regions=36, random_state=0)
    city.name = "no-landuse"
    return without(city, "landuse_counts", "landuse_similarity")


def fast(spec: MethodSpec) -> MethodSpec:
    if spec.name.endswith("+raw"):
        learned = FAST[spec.name.removesuffix("+raw")]
        return dataclasses.replace(spec, params={**spec.params, "learned_params": learned})
    return dataclasses.replace(spec, params={**spec.params, **FAST.get(spec.name, {})})


@pytest.mark.parametrize("name", ["pca", "autoencoder", "mvure", "hafusion", "srel", "srel+raw"])
def test_methods_run_on_a_city_without_land_use(no_landuse: CityData, name: str) -> None:
    spec = get_method(name).for_city(no_landuse)
    assert spec.all_views == ("poi_counts", "od_flows")
    assert spec.config_hash != get_method(name).config_hash  # another configuration than on a full city
    embedder = fast(spec).build(random_state=0)
    embedding = embedder.fit_transform(no_landuse)
    assert embedding.index.equals(no_landuse.region_ids) and np.isfinite(embedding.to_numpy()).all()
    assert set(embedder.required_views) == {"poi_counts", "od_flows"}


def test_the_learned_objective_leaves_out_the_missing_view(no_landuse: CityData) -> None:
    embedder = fast(get_method("hafusion").for_city(no_landuse)).build(random_state=0).fit(no_landuse)
    assert set(embedder.log_.losses[0]) == {"mobility", "poi"}  # no land-use similarity term
    trips_only = without(make_synthetic_city(n_regions=36, random_state=0), "poi_counts", "poi_similarity",
                         "landuse_counts", "landuse_similarity")
    embedder = fast(get_method("hafusion").for_city(trips_only)).build(random_state=0).fit(trips_only)
    assert set(embedder.log_.losses[0]) == {"mobility"}


def test_a_full_city_keeps_the_registered_configuration() -> None:
    city = make_synthetic_city(n_regions=36, random_state=0)
    for name in list_methods():
        spec = get_method(name)
        if spec.unavailable_reason(city) is None:
            assert spec.for_city(city) is spec  # same parameters, same configuration hash, same numbers


@pytest.mark.parametrize(("name", "drop", "missing"), [
    ("hafusion", ("od_flows", "od_target"), "'od_flows'"),
    ("mvure", ("od_flows", "od_target"), "'od_flows'"),
    ("raw-landuse", ("landuse_counts",), "'landuse_counts'"),
    ("mgfn", (), "'od_patterns'"),
    ("pca", ("poi_counts", "landuse_counts", "od_flows", "od_target"), "at least one of"),
])
def test_a_method_that_cannot_run_names_the_missing_view(name: str, drop: tuple[str, ...], missing: str) -> None:
    city = make_synthetic_city(n_regions=36, random_state=0)
    city.views = {k: v for k, v in city.views.items() if k not in drop and not k.endswith("_similarity")}
    with pytest.raises(MethodUnavailableError) as info:
        get_method(name).for_city(city)
    message = str(info.value)
    assert missing in message and city.name in message and "\n" not in message


def test_views_are_declared_once_in_the_registry() -> None:
    """The embedder reads what its spec declares: built with the spec's parameters it reports those views."""
    for name in list_methods():
        spec = get_method(name)
        if not spec.all_views:
            continue
        assert set(spec.requires_views) <= set(spec.all_views), name
        embedder = spec.build(random_state=0)
        declared = set(getattr(embedder, "required_views", ()))
        assert declared <= set(spec.all_views), name
        if spec.views_param is not None:
            assert declared == set(spec.all_views), name
    assert get_method("mgfn").requires_views == ("od_flows", "od_patterns")  # what MGFN reads


def test_benchmark_rows_record_the_views_used(no_landuse: CityData) -> None:
    plan = BenchmarkPlan(datasets=["no-landuse"], methods=["pca", "raw-landuse", "raw-poi"], tasks=["crime"],
                         protocols=["paper"], seeds=[0])
    outcome = run_benchmark(plan, progress=False, cities={"no-landuse": no_landuse})
    views = {r["method"]: r["views"] for r in outcome.rows}
    assert views == {"pca": ["poi_counts", "od_flows"], "raw-poi": ["poi_counts"]}
    assert all(r["status"] == "ok" for r in outcome.rows)
    assert any("raw-landuse" in s and "'landuse_counts'" in s for s in outcome.skipped)


def _cli(*args: str, data_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if data_dir is not None:
        env["URBANPROFILE_DATA"] = str(data_dir)
    return subprocess.run([sys.executable, "-m", "urbanprofile.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_methods_list_says_which_views_each_method_reads() -> None:
    result = _cli("methods", "list")
    assert result.returncode == 0, result.stderr
    lines = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 3}
    assert "od_flows; poi_counts, landuse_counts if present" in lines["hafusion"]
    assert "any of poi_counts, landuse_counts, od_flows" in lines["pca"]
    assert "od_flows, od_patterns" in lines["mgfn"]


def test_own_city_without_land_use_from_the_command_line(raw_city: dict[str, Path], tmp_path: Path) -> None:
    """The user's case: build a city from POIs and trips only, then evaluate pca on it."""
    from urbanprofile.data.build.pipeline import build_dataset
    from urbanprofile.data.build.spec import BuildSpec

    data = tmp_path / "data"
    build_dataset(BuildSpec(city="toy", regions=raw_city["regions"], pois=raw_city["pois"],
                            categories=["food", "shop", "school"], trips=raw_city["trips"],
                            labels=raw_city["labels"]), data / "built" / "toy")
    result = _cli("evaluate", "built-toy", "--method", "pca", "--task", "all", "--protocol", "paper", "--json",
                  data_dir=data)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows and {tuple(r["views"]) for r in rows} == {("poi_counts", "od_flows")}
    result = _cli("evaluate", "built-toy", "--method", "raw-landuse", "--task", "all", "--protocol", "paper",
                  data_dir=data)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: built-toy: raw-landuse needs the 'landuse_counts' view, which built-toy lacks"]
